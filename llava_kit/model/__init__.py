"""The model: vision towers, projectors, the composite LLaVA model and its decoding loop.

Importing this package registers the composite (`LlavaKitConfig`, `LlavaModel`, model_type "llava_kit") with
transformers' Auto classes, so `AutoModel.from_pretrained(merged_dir)` loads a merged model.
"""

from llava_kit.model.llava import LlavaKitConfig, LlavaModel, register_auto_classes

register_auto_classes()

__all__ = ["LlavaKitConfig", "LlavaModel", "register_auto_classes"]
