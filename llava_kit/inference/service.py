"""The one generation service: prompts in, answers out, for chat, eval, the server and the web UI.

    service = GenerationService.from_loaded(open_model_dir("models/mine"))
    prompt = service.prepare([{"role": "user", "content": "<image>\\nWhat shape is it?"}], [pil_image])
    [answer] = service.generate([GenerationRequest(prompt, SamplingParams(max_new_tokens=32))])
    answer.text, answer.finish_reason            # "It is a star.", "stop"

What it owns, so that no front-end repeats it:
- prompt encoding through the model's modality (the training template; `<image>` expanded per image; never
  truncated: a prompt over the LLM's positions is a `PromptTooLongError`), and image preprocessing;
- batching: greedy requests are decoded together as one left-padded batch (each row's answer is what it would be
  alone); sampled requests one at a time, each under its own seed;
- stop tokens (EOS and the template's end-of-turn marker), stop strings, per-request token budgets;
- streaming: each request's text arrives in pieces through its `on_text` callback, as transformers' TextStreamer
  cuts them;
- cancellation: a request's `cancelled()` is checked after every token; a cancelled request stops decoding within
  a token (finish_reason "cancelled"), and a batch ends when all its requests have stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer

from llava_kit.data.templates import render
from llava_kit.errors import UsageError
from llava_kit.inference.sampling import SamplingParams
from llava_kit.modality import Modality, modality_of_model
from llava_kit.model.generation import generate
from llava_kit.model.llava import causal_lm_of
from llava_kit.store.specs import COMPLETION, InferenceSettings


class PromptTooLongError(UsageError):
    """A prompt (images included) longer than the model's positions."""


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """EOS and the template's end-of-turn marker, where it is a single token."""
    if template == COMPLETION:
        return [tokenizer.eos_token_id]
    stops = render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenizer,
                   template).stop_strings
    ids = {tokenizer.eos_token_id}
    for s in stops:
        token_ids = tokenizer.convert_tokens_to_ids([s])
        if token_ids and token_ids[0] is not None and token_ids[0] != tokenizer.unk_token_id:
            ids.add(token_ids[0])
    return sorted(i for i in ids if i is not None)


@dataclass
class Prompt:
    """An encoded prompt: token ids ending where the answer starts, and its images' pixel values."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None
    """[n_views, 3, H, W] for the model's tower, in the order of the `<image>` tags (one view per image; AnyRes:
    each image's base view and tiles); None without images."""
    image_sizes: list[tuple[int, int]] | None = None
    """Each image's (height, width): an AnyRes model lays its tiles out from them (others ignore them)."""


@dataclass
class GenerationRequest:
    """One answer to generate."""

    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str], None] | None = None
    """Receives the answer's text in pieces as it is generated (streaming)."""
    cancelled: Callable[[], bool] | None = None
    """Checked after every token; True stops this request (e.g. its client disconnected)."""


@dataclass
class Completion:
    """A generated answer."""

    text: str
    """The answer, stripped of surrounding whitespace, without stop tokens or stop strings."""
    finish_reason: str
    """"stop" (a stop token or string), "length" (the token budget ran out) or "cancelled"."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated, the stop token included."""


class _CallbackStreamer(TextStreamer):
    """Hands each finished piece of decoded text to a callback (stdout, an SSE stream, ...)."""

    def __init__(self, tokenizer, callback: Callable[[str], None], skip_prompt: bool = True):
        super().__init__(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


class _Row:
    """The answer of one request as it is generated: tokens, stop checks, its stream."""

    def __init__(self, request: GenerationRequest, budget: int, stop_ids: set[int], tokenizer):
        self.request, self.budget, self.stop_ids, self.tokenizer = request, budget, stop_ids, tokenizer
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.stop_strings = request.params.stop
        self.streamed = ""  # text handed to on_text so far (stop strings held back)
        self.streamer = None
        if request.on_text is not None:
            callback = self._stream_piece if self.stop_strings else request.on_text
            self.streamer = _CallbackStreamer(tokenizer, callback, skip_prompt=False)

    def step(self, token: int) -> bool:
        """Take this step's token; True when the row has stopped."""
        if self.finish_reason is not None:
            return True
        self.tokens.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.stop_strings and self._stop_string_at() is not None:
            self.finish_reason = "stop"
        elif self.request.cancelled is not None and self.request.cancelled():
            self.finish_reason = "cancelled"
        elif len(self.tokens) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason is not None and self.streamer is not None:
            self.streamer.end()
            if self.stop_strings:
                self._flush_stream()
        return self.finish_reason is not None

    def _text(self) -> str:
        tokens = self.tokens[:-1] if self.tokens and self.tokens[-1] in self.stop_ids else self.tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _stop_string_at(self) -> int | None:
        text = self._text()
        found = [text.find(s) for s in self.stop_strings if s in text]
        return min(found) if found else None

    def _stream_piece(self, piece: str) -> None:
        """With stop strings: pass on only text that cannot turn out to be part of a stop string."""
        self._flush_stream(final=False)

    def _flush_stream(self, final: bool = True) -> None:
        text = self._text()
        cut = self._stop_string_at()
        if cut is not None:
            text = text[:cut]
        elif not final:  # hold back a tail that could be the start of a stop string
            hold = max(len(s) for s in self.stop_strings) - 1
            text = text[:max(len(text) - hold, len(self.streamed))]
        if len(text) > len(self.streamed):
            self.request.on_text(text[len(self.streamed):])
            self.streamed = text

    def completion(self, prompt_tokens: int) -> Completion:
        text = self._text()
        cut = self._stop_string_at() if self.stop_strings else None
        if cut is not None:
            text = text[:cut]
        return Completion(text.strip(), self.finish_reason or "length", prompt_tokens, len(self.tokens))


class GenerationService:
    """Prompts -> answers for one loaded model (see the module docstring)."""

    def __init__(self, model, tokenizer, settings: InferenceSettings, modality: Modality | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.modality = modality or modality_of_model(model)
        self.stop_ids = stop_token_ids(tokenizer, settings.template)
        text_config = causal_lm_of(self.language_model).config.get_text_config()
        self.position_limit: int | None = getattr(text_config, "max_position_embeddings", None)

    @classmethod
    def from_loaded(cls, loaded) -> GenerationService:
        """The service of a `llava_kit.loader.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, loaded.settings, loaded.modality)

    @property
    def language_model(self):
        return self.modality.language_model(self.model)

    @property
    def supports_images(self) -> bool:
        return self.modality.has_images

    # ------------------------------------------------------------------------------------------ prompts
    def encode(self, messages: list[dict], n_images: int = 0, image_sizes: list | None = None) -> list[int]:
        """Token ids of `messages` (canonical `{role, content}`, `<image>` tags in user content), ending where the
        answer starts; `PromptTooLongError` when they do not leave room for one token of answer. `image_sizes`:
        each image's (height, width), which an AnyRes model counts its tokens from."""
        input_ids = self.modality.encode_prompt(messages, n_images, self.tokenizer, self.settings, self.model,
                                                image_sizes)
        if self.position_limit and len(input_ids) >= self.position_limit:
            raise PromptTooLongError(f"the prompt is {len(input_ids)} tokens (images included), over the model's "
                                     f"{self.position_limit} positions; send fewer images or less text")
        return input_ids

    def preprocess(self, images: list) -> torch.Tensor | None:
        """RGB PIL images -> pixel values [n_views, 3, H, W] (the model's image aspect and tower; AnyRes: every
        image's views); None without images."""
        return self.modality.preprocess_images(list(images), self.model, self.settings)

    def prepare(self, messages: list[dict], images: list = ()) -> Prompt:
        """An encoded prompt of `messages` with its images (PIL, in the order of the `<image>` tags)."""
        pixel_values = self.preprocess(images)
        sizes = image_sizes(images)
        return Prompt(self.encode(messages, len(images), sizes), pixel_values, sizes)

    # ------------------------------------------------------------------------------------------ decoding
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Answer every request; greedy ones as one batch, sampled ones one by one. Results in request order."""
        results: list[Completion | None] = [None] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if greedy:
            for i, completion in zip(greedy, self._decode([requests[i] for i in greedy]), strict=True):
                results[i] = completion
        for i, request in enumerate(requests):
            if results[i] is None:
                results[i] = self._decode([request])[0]
        return results

    def answer(self, messages: list[dict], images: list = (), params: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None) -> Completion:
        """One answer to one conversation."""
        request = GenerationRequest(self.prepare(messages, images), params or SamplingParams(), on_text)
        return self.generate([request])[0]

    @torch.no_grad()
    def _decode(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Decode requests together: all greedy, or a single sampled one."""
        prompts = [r.prompt.input_ids for r in requests]
        room = [self.position_limit - len(p) if self.position_limit else None for p in prompts]
        budgets = [r.params.max_new_tokens if space is None else min(r.params.max_new_tokens, space)
                   for r, space in zip(requests, room, strict=True)]
        rows = [_Row(r, b, set(self.stop_ids), self.tokenizer) for r, b in zip(requests, budgets, strict=True)]
        if all(r.cancelled is not None and r.cancelled() for r in requests):
            return [Completion("", "cancelled", len(p), 0) for p in prompts]
        device = self.model.device
        pad = self.tokenizer.pad_token_id
        width = max(map(len, prompts))
        # Left padding: every row's answer starts at the same position; the mask hides the pads.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # [batch, width]
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        pixels = [r.prompt.pixel_values for r in requests if r.prompt.pixel_values is not None]
        images = self._anyres_inputs([r.prompt for r in requests], device)

        def on_step(tokens: torch.Tensor) -> torch.Tensor:  # tokens [batch] -> rows that stopped [batch]
            return torch.tensor([row.step(int(t)) for row, t in zip(rows, tokens.tolist(), strict=True)])

        params = requests[0].params
        options = {"max_new_tokens": max(budgets), "eos_token_id": self.stop_ids, "pad_token_id": pad,
                   "on_step": on_step}
        if not params.greedy:
            options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        with _seeded(params.seed, device):
            if self.modality.has_images:
                pixel_values = torch.cat(pixels).to(device) if pixels else None
                self.model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **images,
                                    **options)
            else:
                generate(self.model, input_ids=input_ids, attention_mask=attention_mask, **options)
        return [row.completion(len(p)) for row, p in zip(rows, prompts, strict=True)]

    def _anyres_inputs(self, prompts: list[Prompt], device) -> dict:
        """AnyRes: the prompts' image sizes [n_images, 2] and caps [n_images] (each prompt's images share its budget);
        {} for other models."""
        anyres = getattr(self.model, "anyres", None)
        with_images = [p for p in prompts if p.pixel_values is not None]
        if anyres is None or not with_images:
            return {}
        if any(p.image_sizes is None for p in with_images):
            raise UsageError("this model reads images at any resolution (AnyRes): a prompt's images need their "
                             "(height, width) (Prompt.image_sizes); GenerationService.prepare sets them")
        sizes = [size for p in with_images for size in p.image_sizes]
        caps = [cap for p in with_images for cap in anyres.sample_caps(len(p.image_sizes))]
        return {"image_sizes": torch.tensor(sizes, dtype=torch.long, device=device),
                "image_token_caps": torch.tensor(caps, dtype=torch.long, device=device)}


def image_sizes(images) -> list[tuple[int, int]]:
    """(height, width) of PIL images, as AnyRes models take them."""
    return [(image.height, image.width) for image in images]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Sampling draws from a generator seeded with `seed` (the global generator's state is restored after)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
