"""Benchmarks of the harness: RULER, LongBench (v1, E, v2) and needle in a haystack, as kvpress rows."""
