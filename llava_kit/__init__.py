"""llava-kit: build LLaVA-style vision-language models with image projectors at their centre."""

__version__ = "0.1.0"
