"""Benchmarks that print measured figures (not tests): ingest, detector."""
