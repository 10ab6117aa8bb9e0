"""One decoding loop for every generation path of llava-kit: `chat`, `eval`, `serve` and `LlavaModel.generate`.

transformers' `generate` spends a large share of each small decoding step on bookkeeping (logits
processors, stopping criteria, input preparation, mask rebuilding). This loop does per step only what
the answer needs: one forward of the new token through the KV cache, the LM head on the last position,
then argmax or a sample. Its choices copy `generate`'s: position ids from the cumsum of the attention
mask (left padding), an all-ones mask dropped, float32 scores, temperature -> top-k -> top-p -> one
`torch.multinomial` draw. So greedy tokens equal `generate`'s, and so do samples under the same seed.

What the loop does not implement (beam search, repetition penalties, static or quantized caches, a
model whose forward takes no `cache=`) goes to transformers' `generate`, with the reason logged once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from llava_kit.model.llava import causal_lm_of

logger = logging.getLogger(__name__)

# Generation-config settings that change the scores in ways this loop does not apply; a model whose
# generation_config.json sets one of them (e.g. repetition_penalty) decodes with transformers' generate.
UNSUPPORTED_SETTINGS = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                        "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                        "forced_eos_token_id", "min_length", "exponential_decay_length_penalty", "num_beams",
                        "guidance_scale", "watermarking_config", "stop_strings", "top_h", "min_p", "typical_p",
                        "epsilon_cutoff", "eta_cutoff", "remove_invalid_values")
_DEFAULTS = GenerationConfig._get_default_generation_params()  # what generate applies when a model sets nothing
_reported: set[str] = set()  # fallback reasons already logged


StepHook = Callable[[torch.Tensor], "torch.Tensor | None"]
"""Called after each decoding step with that step's tokens [batch]; returns None, or a bool tensor [batch] of rows
that must stop now (their token of this step is kept; later steps pad them). Cancellation, per-row token budgets
and stop strings are built on it (llava_kit/inference/service.py)."""


def generate(language_model, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int, min_new_tokens: int = 0,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, streamer=None,
             on_step: StepHook | None = None, **hf_kwargs) -> torch.Tensor:
    """Decode up to `max_new_tokens` after a prompt; returns only the new tokens [batch, n_new].

    language_model: a transformers causal LM, or a peft model wrapping one.
    input_ids [batch, seq] or inputs_embeds [batch, seq, d]: the prompt (exactly one of them).
    attention_mask [batch, seq]: 1 on real tokens, 0 on left padding; None means no padding.
    eos_token_id: the stop tokens (default: the model's generation config). A row that produced one
    gets `pad_token_id` afterwards; decoding ends when every row has stopped, so n_new may be shorter
    than max_new_tokens. Stop tokens are forbidden for the first `min_new_tokens` steps.
    do_sample: sample with `temperature` and `top_p` (and the model's top_k, 50 by default, as generate
    does) from torch's global RNG; otherwise greedy.
    streamer: a transformers streamer; it gets the prompt first (as from generate), then each step's
    tokens [batch], then `end()`.
    on_step: see StepHook; decoding ends when every row has stopped, by a stop token or by the hook.
    Other keyword arguments (num_beams, ...) are passed to transformers' generate, which then decodes.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be above 0 when sampling, got {temperature}")
    if do_sample and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    lm = causal_lm_of(language_model)
    config = lm.generation_config
    stops = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if stops is None:
        stops = [config.eos_token_id] if isinstance(config.eos_token_id, int) else list(config.eos_token_id or [])
    if pad_token_id is None:  # as generate: the model's pad token, else the first stop token
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)

    reason = _why_not_this_loop(lm, hf_kwargs)
    if reason:
        if reason not in _reported:
            _reported.add(reason)
            logger.warning("decoding with transformers' generate (slower): %s", reason)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        prompt = {"input_ids": input_ids} if input_ids is not None else {"inputs_embeds": inputs_embeds}
        if on_step is not None:
            hf_kwargs["stopping_criteria"] = StoppingCriteriaList([_HookCriteria(on_step)])
        output = language_model.generate(**prompt, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                         min_new_tokens=min_new_tokens, do_sample=do_sample, eos_token_id=stops,
                                         pad_token_id=pad_token_id, streamer=streamer, **sampling, **hf_kwargs)
        return output if input_ids is None else output[:, input_ids.shape[1]:]  # generate repeats input_ids

    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, seq, device = prompt.shape[0], prompt.shape[1], prompt.device
    top_k = config.top_k if config.top_k is not None else _DEFAULTS["top_k"]
    stop_tensor = torch.tensor(stops, device=device, dtype=torch.long)
    with torch.inference_mode():
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention is faster, and it is what generate does
        if attention_mask is None:
            positions = torch.arange(seq, device=device).unsqueeze(0)  # [1, seq]
        else:  # left padding: each row counts positions from its first real token; pads get 0
            positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # [batch, seq]
        if streamer is not None:  # generate puts the prompt first (empty for embeddings); skip_prompt drops it
            streamer.put(input_ids.cpu() if input_ids is not None else torch.zeros(batch, 0, dtype=torch.long))
        cache = DynamicCache(config=lm.config.get_text_config(decoder=True))  # sliding-window layers included
        _preallocate(cache, seq + max_new_tokens)
        # logits_to_keep=1: the LM head on the last position only ([batch, 1, vocab], not [batch, seq, vocab])
        logits = lm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_position = positions[:, -1:] + 1  # [batch or 1, 1]
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            scores = logits.float()  # [batch, vocab]
            if step < min_new_tokens and stops:
                scores[:, stop_tensor] = -float("inf")
            token = _sample(scores, temperature, top_k, top_p) if do_sample else scores.argmax(-1)  # [batch]
            token = torch.where(unfinished, token, pad_token_id)  # a row that stopped only pads
            unfinished &= ~torch.isin(token, stop_tensor)
            new_tokens.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            if on_step is not None:
                stop_rows = on_step(token)
                if stop_rows is not None:
                    unfinished &= ~stop_rows.to(device)
            if step == max_new_tokens - 1 or not bool(unfinished.any()):
                break
            if attention_mask is not None:  # the new token is real in every row
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
            logits = lm(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                        cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            next_position = next_position + 1
        if streamer is not None:
            streamer.end()
    return torch.stack(new_tokens, dim=1)  # [batch, n_new]


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values go into buffers sized for the whole generation.

    DynamicLayer concatenates each step's keys and values to the cache, copying all of it every token: at batch 16
    and ~250 positions that copy was a quarter of a decoding step on a CPU. Here each step writes its slice in place
    and the layer exposes views of the filled part, so attention reads the same values; past `capacity` (never, as
    the loop sizes it) it grows like DynamicLayer.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, key_dim = key_states.shape
        self._keys = key_states.new_empty(batch, heads, self.capacity, key_dim)  # [batch, heads, capacity, dim]
        self._values = value_states.new_empty(batch, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.keys, self.values = self._keys[..., :0, :], self._values[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # more than the loop asked for: grow by concatenation from here on
            self._keys = torch.cat([self._keys[..., :self.length, :], key_states], dim=-2)
            self._values = torch.cat([self._values[..., :self.length, :], value_states], dim=-2)
            self.capacity = end
        else:
            self._keys[..., self.length:end, :] = key_states
            self._values[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._keys[..., :end, :], self._values[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.is_initialized, self.length = False, 0


def _preallocate(cache: DynamicCache, capacity: int) -> None:
    """Give `cache`'s full-attention layers (exactly DynamicLayer: sliding-window ones stay) preallocated buffers."""
    cache.layers = [_PreallocatedLayer(capacity) if type(layer) is DynamicLayer and not layer.is_initialized
                    else layer for layer in cache.layers]


class _HookCriteria(StoppingCriteria):
    """A StepHook as transformers' stopping criterion, for models that decode with `generate`."""

    def __init__(self, on_step: StepHook):
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stop_rows = self.on_step(input_ids[:, -1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device) if stop_rows is None \
            else stop_rows.to(input_ids.device)


def _sample(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row from float32 scores [batch, vocab], with generate's warpers in generate's order."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:  # keep the k best scores (ties with the k-th included)
        kth_best = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if top_p < 1.0:  # drop the least likely tokens whose total probability stays within 1 - top_p
        ascending, order = torch.sort(scores, descending=False)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)


def _why_not_this_loop(lm, hf_kwargs: dict) -> str | None:
    """Why `lm` must decode with transformers' generate instead of this loop; None when it need not."""
    if hf_kwargs:
        return f"argument(s) {', '.join(sorted(hf_kwargs))} are not implemented by llava-kit's decoding loop"
    if lm.config.is_encoder_decoder:
        return f"{type(lm).__name__} is an encoder-decoder model"
    if not getattr(lm, "_supports_default_dynamic_cache", lambda: True)():
        return f"{type(lm).__name__} needs its own cache class"
    config = lm.generation_config
    if config.cache_implementation not in (None, "dynamic"):
        return f"the generation config asks for the {config.cache_implementation!r} cache"
    parameters = inspect.signature(lm.forward).parameters
    missing = [name for name in ("cache", "logits_to_keep", "position_ids") if name not in parameters]
    if missing:
        return f"{type(lm).__name__}.forward takes no {', '.join(missing)} argument (older or remote code)"
    for name in UNSUPPORTED_SETTINGS:
        value = getattr(config, name, None)
        if value is not None and value != _DEFAULTS.get(name):
            return f"the generation config sets {name}={value!r}"
    return None
