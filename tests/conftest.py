"""Shared fixtures: tiny models built once per test session in a temporary directory (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Keep `tiny:` models and caches of the test run out of the user's home."""
    home = tmp_path_factory.mktemp("llava_kit_home")
    os.environ["LLAVA_KIT_HOME"] = str(home)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield home


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from llava_kit.data.encode import add_image_token
    from llava_kit.testing.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(1024)
    add_image_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """`{vision, llm}` directories of tiny random models saved like real checkpoints."""
    from llava_kit.testing.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP tower saved as a transformers directory (32 px, 8 px patches), with its processor."""
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    path = tmp_path_factory.mktemp("siglip")
    config = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(1)
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tiny_dirs):
    """A tiny random Qwen2 LLM (tied embeddings) with the tiny tokenizer, saved as a transformers directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
