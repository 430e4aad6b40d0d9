"""Helpers for the tests and the benchmarks, not for stations: a throwaway real Milvus server.

They need the test extra (`pip install -e '.[test]'`, which brings PyPI `milvus`)."""
