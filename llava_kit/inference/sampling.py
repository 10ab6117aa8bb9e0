"""How to decode an answer: `SamplingParams`, checked when built, so a bad value never reaches the model.

    SamplingParams()                                   # greedy, 256 new tokens at most
    SamplingParams(temperature=0.7, top_p=0.9, seed=1, stop=("###",))

Every front-end (chat, eval, the server, the web UI) builds one of these from its own arguments; a value out of
range (NaN, top_p 0 or 5, a negative temperature) is a `SamplingError` that names the parameter and its range,
which the server answers with HTTP 400 and the CLI with exit 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llava_kit.errors import UsageError

MAX_STOP_STRINGS = 4  # OpenAI's limit


class SamplingError(UsageError):
    """A sampling parameter out of range; `param` names it (the API's `param` field of an error)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request."""

    max_new_tokens: int = 256
    """The longest answer, in tokens (>= 1)."""
    temperature: float = 0.0
    """0 is greedy decoding (the default: answers are reproducible); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p, in [0, 1] (0 keeps only the
    most likely token)."""
    seed: int | None = None
    """Seed of the sampling draws (same seed, same answer); None draws from torch's global generator."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end the answer (not included in it), at most 4."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_new_tokens!r}", "max_tokens")
        if not _finite_number(self.temperature) or self.temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}",
                                "temperature")
        if not _finite_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise SamplingError(f"top_p must be a number in [0, 1], got {self.top_p!r}", "top_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}", "seed")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise SamplingError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
                                f"strings, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
