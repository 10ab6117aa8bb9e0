"""Caption an image folder into LLaVA training data through any OpenAI-compatible vision API.

Entry point: `llava-kit caption` (or `python -m data_gen`); see docs/data_gen.md. Never imports torch.
"""
