"""Training: every stage on the Hugging Face Trainer (engine.py) and the loss plot."""
