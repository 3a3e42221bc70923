"""The test suite (a regular package, so that `tests.helpers` resolves here even when an installed distribution ships a top-level `tests` package)."""
