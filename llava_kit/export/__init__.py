"""Conversions: merge a run into one directory, export to transformers' llava format, import checkpoints made elsewhere."""
