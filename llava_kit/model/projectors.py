"""Projectors (connectors): vision features [batch, tokens, C] -> LLM input embeddings [batch, tokens_out, d].

    projector = build_projector("mlp2x_gelu", vision_width=1024, llm_width=4096, grid=(24, 24))
    embeddings = projector(features)   # [batch, 576, 1024] -> [batch, projector.num_output_tokens, 4096]

Names are exact: a key of PROJECTORS, or a member of a numbered family in PROJECTOR_FAMILIES (`mlp{N}x_gelu`, any
N >= 1, LLaVA's pattern `^mlp(\\d+)x_gelu$`). An unknown name is an error that lists the valid ones.

Adding a projector: subclass `Projector`; its __init__ takes (vision_width, llm_width, grid, has_cls, *, options
with defaults), calls `super().__init__(vision_width, llm_width, grid, has_cls)` first, refuses inputs it cannot
take with `self.refuse(reason)` (e.g. a CLS token, an odd grid), and sets `self.num_output_tokens` if it changes the
token count; then add its name to PROJECTORS below. `build_projector` checks option names against the signature.
"""

import difflib
import inspect
import re
from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn


class ProjectorError(ValueError):
    """A projector cannot be built as asked; the message says what to change."""


class Projector(nn.Module):
    """Base of every projector: [batch, num_input_tokens, vision_width] -> [batch, num_output_tokens, llm_width].

    The input is the vision tower's selected tokens: a leading CLS token when `has_cls`, then the patch tokens of a
    `grid` = (rows, cols) in row-major order. `num_output_tokens` is known once the projector is built, so the data
    pipeline can expand each `<image>` to that many placeholders before any image is encoded.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__()
        for label, value in (("vision_width", vision_width), ("llm_width", llm_width)):
            if not _is_positive_int(value):
                raise ProjectorError(f"{label} must be a positive integer, got {value!r}")
        if not (isinstance(grid, Sequence) and len(grid) == 2 and all(_is_positive_int(g) for g in grid)):
            raise ProjectorError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
        if not isinstance(has_cls, bool):
            raise ProjectorError(f"has_cls must be True or False, got {has_cls!r}")
        self.vision_width = vision_width
        self.llm_width = llm_width
        self.grid = (int(grid[0]), int(grid[1]))
        self.has_cls = has_cls
        self.num_input_tokens = self.grid[0] * self.grid[1] + int(has_cls)
        self.num_output_tokens = self.num_input_tokens  # token-wise projectors; spatial ones overwrite it

    def refuse(self, reason: str) -> NoReturn:
        """Raise ProjectorError saying this projector cannot take its input layout, and why (for subclasses)."""
        rows, cols = self.grid
        layout = f"a CLS token + {rows}x{cols} patch grid" if self.has_cls else f"a {rows}x{cols} patch grid"
        raise ProjectorError(f"cannot take {layout}: {reason}")

    def check_features(self, features: torch.Tensor) -> None:
        """Raise ProjectorError unless `features` is [batch, num_input_tokens, vision_width]."""
        if features.dim() != 3 or tuple(features.shape[1:]) != (self.num_input_tokens, self.vision_width):
            raise ProjectorError(
                f"{type(self).__name__} expects features [batch, {self.num_input_tokens}, {self.vision_width}] "
                f"(grid {self.grid[0]}x{self.grid[1]}, has_cls={self.has_cls}), got {list(features.shape)}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, num_input_tokens, vision_width] -> [batch, num_output_tokens, llm_width]."""
        raise NotImplementedError


# Initialisation: PyTorch's default nn.Linear init (Kaiming-uniform, bound 1/sqrt(fan_in)), as LLaVA, which builds its
# mm_projector after loading the LLM, so the LLM's normal(0.02) init never touches it: that is the recipe behind the
# published LLaVA-1/1.5 checkpoints. It also scales with the input width (std ~ 1/sqrt(3 * fan_in)), which keeps
# the output scale sensible for tiny test widths as for C = 1024, where a fixed 0.02 would not.


class LinearProjector(Projector):
    """LLaVA-1's `linear`: one Linear C -> d on every token. State dict `weight`, `bias`, as LLaVA's mm_projector."""

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False):
        super().__init__(vision_width, llm_width, grid, has_cls)
        linear = nn.Linear(vision_width, llm_width)  # default init: see above
        self.weight = linear.weight  # [llm_width, vision_width]
        self.bias = linear.bias  # [llm_width]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        return F.linear(features, self.weight, self.bias)  # [batch, tokens, llm_width]


class MlpGeluProjector(Projector, nn.Sequential):
    """LLaVA-1.5's `mlp{N}x_gelu`: Linear C -> d, then (N - 1) x [GELU, Linear d -> d], on every token.

    An nn.Sequential, so the state dict reads `0.weight, 0.bias, 2.weight, 2.bias, ...` exactly like LLaVA's
    `mm_projector`: weights move between the two without renaming.
    """

    def __init__(self, vision_width: int, llm_width: int, grid: Sequence[int], has_cls: bool = False,
                 depth: int = 2):
        super().__init__(vision_width, llm_width, grid, has_cls)  # Projector, then nn.Sequential() (empty)
        if not _is_positive_int(depth):
            raise ProjectorError(f"depth must be a positive integer, got {depth!r}")
        self.depth = depth
        self.append(nn.Linear(vision_width, llm_width))  # default init: see above
        for _ in range(depth - 1):
            self.append(nn.GELU())
            self.append(nn.Linear(llm_width, llm_width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_features(features)
        for layer in self:
            features = layer(features)
        return features  # [batch, tokens, llm_width]


# Exact names -> classes. New projectors (the zoo) are added here, next to their classes.
PROJECTORS: dict[str, type[Projector]] = {
    "linear": LinearProjector,
}

# Numbered names: display form -> (pattern matched against the whole name, class, the option the number sets).
# re.ASCII: \d is 0-9 only, as in LLaVA's builder; fullmatch: no trailing newline slips through as `$` would allow.
PROJECTOR_FAMILIES: dict[str, tuple[re.Pattern, type[Projector], str]] = {
    "mlp{N}x_gelu": (re.compile(r"mlp(\d+)x_gelu", re.ASCII), MlpGeluProjector, "depth"),
}

# Arguments every projector takes; anything else in a projector's __init__ is an option.
_COMMON_ARGUMENTS = ("self", "vision_width", "llm_width", "grid", "has_cls")


def projector_names() -> list[str]:
    """Valid projector names: the exact ones, then the numbered families in display form (`mlp{N}x_gelu`)."""
    return sorted(PROJECTORS) + list(PROJECTOR_FAMILIES)


def resolve_projector(name: str) -> tuple[type[Projector], dict[str, int]]:
    """Map a projector name to (class, options its name sets); ProjectorError for an unknown name."""
    if not isinstance(name, str):
        raise ProjectorError(f"projector name must be a string, got {name!r}")
    if name in PROJECTORS:
        return PROJECTORS[name], {}
    for display, (pattern, projector_class, option) in PROJECTOR_FAMILIES.items():
        match = pattern.fullmatch(name)
        if match:
            number = int(match.group(1))
            if number < 1:
                raise ProjectorError(f"projector {name!r}: N in {display} must be at least 1")
            return projector_class, {option: number}
    examples = sorted(PROJECTORS) + ["mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"]
    close = difflib.get_close_matches(name, examples, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(name.lower(), examples, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ProjectorError(f"unknown projector {name!r}. Valid names: {', '.join(projector_names())} "
                         f"(N >= 1; mlp2x_gelu is LLaVA-1.5's).{hint}")


def build_projector(name: str, vision_width: int, llm_width: int, grid: tuple[int, int], has_cls: bool = False,
                    **options) -> Projector:
    """Build the projector `name` for features of `vision_width` on `grid` (plus a leading CLS token if has_cls),
    producing tokens of `llm_width`. `options` are the projector's own keyword arguments; unknown ones are errors.
    """
    projector_class, named_options = resolve_projector(name)
    accepted = [option for option in _option_names(projector_class) if option not in named_options]
    for option in options:
        if option in named_options:
            raise ProjectorError(f"projector {name!r}: option {option!r} is set by the name itself "
                                 f"({option}={named_options[option]}); change the name instead")
        if option not in accepted:
            raise ProjectorError(f"projector {name!r} has no option {option!r}; it accepts: "
                                 f"{', '.join(accepted) if accepted else 'no options'}")
    try:
        projector = projector_class(vision_width, llm_width, grid, has_cls, **named_options, **options)
    except ProjectorError as err:
        raise ProjectorError(f"projector {name!r}: {err}") from None
    projector.name = name
    return projector


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only those with requires_grad if trainable_only."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _option_names(projector_class: type[Projector]) -> list[str]:
    """Keyword arguments of a projector's __init__ beyond the common ones."""
    parameters = inspect.signature(projector_class.__init__).parameters.values()
    return [p.name for p in parameters if p.name not in _COMMON_ARGUMENTS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
