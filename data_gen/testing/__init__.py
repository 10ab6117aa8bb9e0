"""Test helpers shipped with data_gen: an OpenAI-compatible stub server (stdlib only)."""
