"""`llava-kit demo`: the whole pipeline offline on synthetic shapes (see `pipeline.py`)."""

from llava_kit.demo.pipeline import DemoRecipe, run_demo

__all__ = ["DemoRecipe", "run_demo"]
