"""Stand-in for dxtbx (tests only): see ../README.txt."""
