"""Chat with a model about images: the code path behind `llava-kit chat`, `eval` and serving.

    llava-kit chat --model runs/demo/merged --image pic.png                      # interactive REPL
    llava-kit chat --model runs/demo/merged --image pic.png --prompt "What shape is in the image?"

Prompts go through the same template and tokenizer step as training (`encode_messages` with a
generation prompt), so what the model saw in training is what it sees here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TextStreamer

from llava_kit.data.encode import encode_messages
from llava_kit.data.images import load_image, prepare_image
from llava_kit.data.templates import IMAGE_TOKEN, render
from llava_kit.errors import UsageError
from llava_kit.model.generation import generate

COMPLETION = "completion"  # the inference template of text-pt models (see export/merge.py)

REPL_HELP = """commands:
  /image PATH   switch to another image (it joins the conversation at your next message)
  /reset        forget the conversation and the images
  /help         this text
  /exit         quit (or Ctrl-D)"""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0


class _CallbackStreamer(TextStreamer):
    """Hands each finished piece of decoded text to a callback (stdout, an SSE stream, ...)."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def stop_token_ids(tokenizer, template: str) -> list[int]:
    """EOS and the template's end-of-turn marker, where it is a single token."""
    stops = render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], tokenizer,
                   template).stop_strings
    ids = {tokenizer.eos_token_id}
    for s in stops:
        token_ids = tokenizer.convert_tokens_to_ids([s])
        if token_ids and token_ids[0] is not None and token_ids[0] != tokenizer.unk_token_id:
            ids.add(token_ids[0])
    return sorted(i for i in ids if i is not None)


@dataclass
class ChatSession:
    """A multi-turn conversation with images; `ask()` returns (and optionally streams) each answer."""

    model: object
    tokenizer: object
    settings: object  # InferenceSettings
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    messages: list[dict] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    pending_image: torch.Tensor | None = None

    @property
    def text_only(self) -> bool:
        """True for a plain causal LM (a merged text run): no vision tower, no `<image>` token."""
        return not hasattr(self.model, "vision_tower")

    def set_image(self, path: str) -> None:
        """Load an image; it is attached to the next user message."""
        if self.text_only:
            raise UsageError("this is a text-only model (no vision tower): it cannot look at images; drop --image, "
                             "or use it as model.llm of a pretrain run to give it eyes")
        tower = self.model.vision_tower
        image = prepare_image(load_image(path), self.settings.image_aspect, tower.image_mean)
        self.pending_image = tower.preprocess([image])  # [1, 3, H, W]

    def reset(self) -> None:
        self.messages, self.images, self.pending_image = [], [], None

    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn marker, where it is a single token."""
        if self.settings.template == COMPLETION:
            return [self.tokenizer.eos_token_id]
        return stop_token_ids(self.tokenizer, self.settings.template)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to `on_text` if given), and return it."""
        content = text
        if self.pending_image is not None:
            content = f"{IMAGE_TOKEN}\n{text}" if IMAGE_TOKEN not in text else text
            self.images.append(self.pending_image)
            self.pending_image = None
        self.messages.append({"role": "user", "content": content})
        device = self.model.device
        input_ids = torch.tensor([self._prompt_ids()], device=device)
        # a plain causal LM takes no pixel_values argument at all
        images = {"pixel_values": torch.cat(self.images).to(device)} if self.images else {}
        g = self.generation
        sampling = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p} if g.temperature > 0 else \
            {"do_sample": False}
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text else None
        options = {"max_new_tokens": g.max_new_tokens, "eos_token_id": self.stop_token_ids(),
                   "pad_token_id": self.tokenizer.pad_token_id, "streamer": streamer, **sampling}
        # both return only the new tokens [1, new]
        output = generate(self.model, input_ids=input_ids, **options) if self.text_only else \
            self.model.generate(input_ids, **images, **options)
        answer = self.tokenizer.decode(output[0], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


    def _prompt_ids(self) -> list[int]:
        """The conversation so far, ending where the answer starts (text-pt models: `<bos>` + the last message)."""
        if self.settings.template == COMPLETION:
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            return bos + self.tokenizer(self.messages[-1]["content"], add_special_tokens=False)["input_ids"]
        image_token_id = getattr(self.model, "image_token_id", -1)  # -1: a text model, no `<image>` token
        enc = encode_messages(self.messages, self.tokenizer, self.settings.template, image_token_id,
                              getattr(self.model, "tokens_per_image", 0), max_seq_len=10**9,
                              n_images=len(self.images), system_prompt=self.settings.system_prompt,
                              add_generation_prompt=True)
        return enc.input_ids


def answer_batch(session: ChatSession, questions: list[tuple[str | None, str]]) -> list[str]:
    """Answer several one-turn questions `(image, prompt)` in one batched greedy generation.

    Same prompts as `answer_once` (each in a fresh conversation), left-padded so that every row's answer
    starts at the same position; used by `eval`, where one-by-one generation dominates the time.
    """
    if session.text_only:  # a plain causal LM: one by one through `ask` (its prompts differ, see _prompt_ids)
        return [answer_once(session, image, prompt) for image, prompt in questions]
    prompts, images = [], []
    tower = session.model.vision_tower
    for image, prompt in questions:
        content = prompt
        if image:
            images.append(tower.preprocess([prepare_image(load_image(image), session.settings.image_aspect,
                                                          tower.image_mean)]))
            content = f"{IMAGE_TOKEN}\n{prompt}"
        enc = encode_messages([{"role": "user", "content": content}], session.tokenizer, session.settings.template,
                              session.model.image_token_id, session.model.tokens_per_image, max_seq_len=10**9,
                              n_images=1 if image else 0, system_prompt=session.settings.system_prompt,
                              add_generation_prompt=True)
        prompts.append(enc.input_ids)
    width = max(map(len, prompts))
    pad = session.tokenizer.pad_token_id
    device = session.model.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pixel_values = torch.cat(images).to(device) if images else None
    output = session.model.generate(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                    max_new_tokens=session.generation.max_new_tokens, do_sample=False,
                                    eos_token_id=session.stop_token_ids(), pad_token_id=pad)
    return [session.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]


def answer_once(session: ChatSession, image: str | None, prompt: str) -> str:
    """One question about one image in a fresh conversation (used by `chat --prompt` and `eval`)."""
    session.reset()
    if image:
        session.set_image(image)
    return session.ask(prompt)


def run_repl(session: ChatSession, image: str | None = None, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Interactive multi-turn chat on a terminal; answers stream to stdout as they are generated."""
    if image:
        session.set_image(image)
    print(f"chatting (image: {image or 'none'}); /help for commands", file=sys.stderr)
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/help":
            print(REPL_HELP, file=sys.stderr)
            continue
        if line == "/reset":
            session.reset()
            print("conversation cleared", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path)
                print(f"image: {path}", file=sys.stderr)
            except ValueError as err:
                print(f"cannot use {path!r}: {err}", file=sys.stderr)
            continue

        def write(piece: str) -> None:
            stdout.write(piece)
            stdout.flush()

        session.ask(line, on_text=write)
        stdout.write("\n")
        stdout.flush()
