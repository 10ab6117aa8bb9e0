"""A multi-turn conversation with images, on the generation service: what `llava-kit chat` talks to.

    session = ChatSession.from_loaded(open_model_dir("models/mine"), SamplingParams(max_new_tokens=64))
    session.set_image("pic.png")
    session.ask("What shape is in the image?")          # "It is a star."
    session.ask("What color is it?")                     # the conversation so far is the prompt

Prompts go through the same template and tokenizer step as training, so what the model saw in training is what
it sees here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llava_kit.data.images import load_image
from llava_kit.data.templates import IMAGE_TOKEN
from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import GenerationRequest, GenerationService, Prompt
from llava_kit.store.specs import InferenceSettings


@dataclass
class ChatSession:
    """A conversation with one model; `ask()` returns (and optionally streams) each answer."""

    model: object
    tokenizer: object
    settings: InferenceSettings
    generation: SamplingParams = field(default_factory=SamplingParams)
    messages: list[dict] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    """Pixel values [n_views, 3, H, W] of the images in the conversation, in order (one view each; AnyRes: more)."""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) of the images in the conversation, in order."""
    pending_image: torch.Tensor | None = None
    """An image set with `set_image`, attached to the next user message."""
    pending_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.service = GenerationService(self.model, self.tokenizer, self.settings)

    @classmethod
    def from_loaded(cls, loaded, generation: SamplingParams | None = None) -> ChatSession:
        """A session with a `llava_kit.loader.LoadedModel`."""
        return cls(loaded.model, loaded.tokenizer, loaded.settings, generation or SamplingParams())

    def set_image(self, path: str) -> None:
        """Load an image; it is attached to the next user message (a text model refuses it)."""
        image = load_image(path)
        self.pending_image = self.service.preprocess([image])  # [n_views, 3, H, W]
        self.pending_size = (image.height, image.width)

    def reset(self) -> None:
        self.messages, self.images, self.image_sizes, self.pending_image = [], [], [], None

    def stop_token_ids(self) -> list[int]:
        """EOS and the template's end-of-turn marker, where it is a single token."""
        return self.service.stop_ids

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the answer (streamed to `on_text` if given), and return it."""
        content = text
        if self.pending_image is not None:
            content = f"{IMAGE_TOKEN}\n{text}" if IMAGE_TOKEN not in text else text
            self.images.append(self.pending_image)
            self.image_sizes.append(self.pending_size)
            self.pending_image = None
        self.messages.append({"role": "user", "content": content})
        prompt = Prompt(self._prompt_ids(), torch.cat(self.images) if self.images else None, list(self.image_sizes))
        answer = self.service.generate([GenerationRequest(prompt, self.generation, on_text)])[0].text
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def _prompt_ids(self) -> list[int]:
        """The conversation so far, ending where the answer starts."""
        return self.service.encode(self.messages, len(self.images), self.image_sizes)


def answer_once(session: ChatSession, image: str | None, prompt: str) -> str:
    """One question about one image in a fresh conversation (used by `chat --prompt`)."""
    session.reset()
    if image:
        session.set_image(image)
    return session.ask(prompt)
