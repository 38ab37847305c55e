"""Stand-in for DIALS (tests only): see ../README.txt."""
