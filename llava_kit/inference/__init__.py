"""Inference: the generation service every front-end uses (chat, eval, the server, the web UI).

- `sampling.py`  SamplingParams: decoding settings, validated when built
- `service.py`   GenerationService: prompt encoding, batching, stop tokens and strings, streaming, cancellation
- `session.py`   ChatSession: a multi-turn conversation with images on the service
"""

from llava_kit.inference.sampling import SamplingError, SamplingParams
from llava_kit.inference.service import Completion, GenerationRequest, GenerationService, Prompt, PromptTooLongError
from llava_kit.inference.session import ChatSession, answer_once

__all__ = ["ChatSession", "Completion", "GenerationRequest", "GenerationService", "Prompt", "PromptTooLongError",
           "SamplingError", "SamplingParams", "answer_once"]
