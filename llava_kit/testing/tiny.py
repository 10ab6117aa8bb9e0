"""Tiny random models for tests, the demo, benchmarks and offline experiments (no downloads).

    llava-kit init-tiny OUT_DIR      # OUT_DIR/vision (CLIP vision + processor), OUT_DIR/llm (Llama + BPE)

The models are saved with `save_pretrained`, so everything downstream loads them through the same
code paths as real checkpoints. Configs can name them `tiny:vision` and `tiny:llm`: those resolve
to a copy built once under `$LLAVA_KIT_HOME/tiny/` (default `~/.cache/llava-kit/tiny/`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_kit.errors import ModelLoadError

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_VERSION = "v1"  # bump when the default specs change, so cached copies are rebuilt

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@dataclass
class TinyVisionSpec:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512


@dataclass
class TinyLLMSpec:
    vocab_size: int = 1024
    """Target BPE vocabulary (the trained tokenizer may end slightly smaller)."""
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 688
    max_position_embeddings: int = 1024


def tokenizer_corpus() -> list[str]:
    """Text the tiny BPE is trained on: the words the demo and tests use, plus plain English."""
    from llava_kit.data.templates import CHATML_SYSTEM, VICUNA_SYSTEM

    words = ("circle square triangle star red green blue yellow purple orange white light gray background "
             "shape color colour image picture photo describe what is in the it a an the on of and")
    sentences = [
        "What shape is in the image?", "What color is the shape?", "Describe the image.",
        "It is a circle.", "It is a square.", "It is a triangle.", "It is a star.",
        "The shape is red.", "The shape is green.", "The shape is blue.", "The shape is yellow.",
        "The shape is purple.", "The shape is orange.", "A red circle on a white background.",
        "A blue star on a light gray background.", "Who are you?", "I am a helpful assistant.",
        "Describe the image concisely.", "Provide a brief description of the given image.",
        "The quick brown fox jumps over the lazy dog.", "Hello! How can I help you today?",
        "USER: ASSISTANT: system user assistant", VICUNA_SYSTEM, CHATML_SYSTEM,
        "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / \\ * + = < > # @ & %",
    ]
    return [words] * 20 + sentences * 20


def build_tiny_tokenizer(vocab_size: int):
    """Train a byte-level BPE on `tokenizer_corpus()` and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # keep exact character offsets
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def init_tiny_llm(out_dir: str | Path, spec: TinyLLMSpec | None = None, seed: int = 0) -> Path:
    """Write a random Llama causal LM and its locally trained tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyLLMSpec()
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():  # seeded weights without resetting the caller's random state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def init_tiny_vision(out_dir: str | Path, spec: TinyVisionSpec | None = None, seed: int = 0) -> Path:
    """Write a random CLIP vision model and its image processor to `out_dir`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    spec = spec or TinyVisionSpec()
    out_dir = Path(out_dir)
    config = CLIPVisionConfig(**asdict(spec), projection_dim=spec.hidden_size)
    with torch.random.fork_rng():  # seeded weights without resetting the caller's random state
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    model.save_pretrained(out_dir)
    size = spec.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(out_dir)
    return out_dir


def init_tiny(out_dir: str | Path, vision: TinyVisionSpec | None = None, llm: TinyLLMSpec | None = None,
              seed: int = 0) -> dict[str, Path]:
    """Write `out_dir/vision` and `out_dir/llm`; returns both paths."""
    out_dir = Path(out_dir)
    return {"vision": init_tiny_vision(out_dir / "vision", vision, seed),
            "llm": init_tiny_llm(out_dir / "llm", llm, seed)}


def tiny_home() -> Path:
    return Path(os.environ.get("LLAVA_KIT_HOME", Path.home() / ".cache" / "llava-kit")) / "tiny" / TINY_VERSION


def tiny_model_path(name: str) -> str:
    """The directory of the tiny random model `name` ("vision" or "llm"), built once under `tiny_home()`.

    What `tiny:vision` / `tiny:llm` resolve to (llava_kit.model.sources)."""
    if name not in ("vision", "llm"):
        raise ModelLoadError(f"unknown tiny model {TINY_PREFIX + name!r}; use tiny:vision or tiny:llm")
    home = tiny_home()
    target = home / name
    if not (target / "config.json").is_file():
        logger.info("building tiny random %s model in %s", name, target)
        tmp = home / f".{name}.tmp{os.getpid()}"
        (init_tiny_vision if name == "vision" else init_tiny_llm)(tmp)
        tmp.replace(target) if not target.exists() else None  # another process may have won the race
    return str(target)
