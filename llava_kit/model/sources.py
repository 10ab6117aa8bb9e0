"""Where model names point: hub ids and local paths pass through; `scheme:name` names resolve to a local directory.

    resolve_model_path("tiny:llm")        # -> ~/.cache/llava-kit/tiny/v1/llm (built once, offline)
    resolve_model_path("lmsys/vicuna-7b-v1.5")   # unchanged: transformers resolves hub ids and paths itself

A scheme is a prefix mapped to the function that turns the rest of the name into a directory. The function is
named by a string and imported only when a name uses its scheme, so the core does not depend on the modules that
provide the models (the tiny random models live in `llava_kit.testing`, off the core paths).
"""

from __future__ import annotations

import importlib

NAME_SCHEMES = {"tiny:": "llava_kit.testing.tiny:tiny_model_path"}
"""Prefix -> "module:function" taking the name after the prefix and returning a local directory."""


def resolve_model_path(name_or_path: str) -> str:
    """A local directory for `scheme:name` model names (see NAME_SCHEMES); any other name or path unchanged."""
    for prefix, target in NAME_SCHEMES.items():
        if name_or_path.startswith(prefix):
            module_name, function_name = target.split(":")
            return getattr(importlib.import_module(module_name), function_name)(name_or_path[len(prefix):])
    return name_or_path
