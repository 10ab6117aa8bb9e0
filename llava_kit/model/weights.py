"""Weights that several processes share: reading them whole when DeepSpeed ZeRO-3 has partitioned them.

Under ZeRO-3 each process holds a slice of every large parameter (`param.ds_id` marks it; its `.data` is
empty outside a forward pass), so `module.state_dict()` would save empty tensors. `whole_state_dict` gathers
one parameter at a time (a collective: every process must call it, in the same order) and lets only the
process that writes keep a CPU copy, so neither GPU nor host memory ever holds more than one extra parameter
per process besides the writer's copy. Without ZeRO-3 it is `module.state_dict()` moved to the CPU.
"""

from __future__ import annotations

from collections.abc import Container

import torch
from torch import nn


def is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned any of `module`'s parameters across processes."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def whole_state_dict(module: nn.Module, only: Container[str] | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every tensor whole and on the CPU (entries named in `only`, if given).

    Collective under ZeRO-3: every process calls it; those with `keep=False` take part in the gathering and get `{}`.
    """
    state = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if only is not None and name not in only:
            continue
        if hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):  # all-gather: .data is whole inside the block
                if keep:
                    state[name] = tensor.data.detach().to("cpu", copy=True)
        elif keep:
            state[name] = tensor.detach().cpu()
    return state


def trained_names(module: nn.Module) -> set[str]:
    """State-dict names of `module`'s trainable parameters (LoRA adapters, a projector, a fully trained LLM)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def read_prefixed_weights(directory, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a transformers checkpoint directory (model.safetensors, or shards with their index) whose
    names start with `prefix`, named without it; only those tensors are read from disk."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({file for name, file in weight_map.items() if name.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    state = {}
    for file in files:
        with safe_open(str(directory / file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    state[name[len(prefix):]] = f.get_tensor(name)
    return state
