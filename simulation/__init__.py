"""Simulated DIALS data with known geometry, for the tests, the benchmarks and the
bundled examples (not shipped with the package)."""
