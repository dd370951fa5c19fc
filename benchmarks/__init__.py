"""Benchmarks, resource tables and traffic models (run as ``python -m benchmarks.<name>``)."""
