"""Tiny random models for tests, the demo, benchmarks and offline experiments; reached from the core only by name (`tiny:` in llava_kit/model/sources.py)."""
