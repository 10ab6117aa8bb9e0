"""Projectors (connectors): vision features [batch, tokens, C] -> LLM input embeddings [batch, tokens_out, d].

    projector = build_projector("mlp2x_gelu", vision_width=1024, llm_width=4096, grid=(24, 24))
    embeddings = projector(features)   # [batch, 576, 1024] -> [batch, projector.num_output_tokens, 4096]

Names are exact: a key of PROJECTORS, or a member of a numbered family in PROJECTOR_FAMILIES (`mlp{N}x_gelu`, any
N >= 1, LLaVA's pattern `^mlp(\\d+)x_gelu$`). An unknown name is an error that lists the valid ones.

This module is the registry and holds LLaVA's own two designs (linear, mlp{N}x_gelu); the zoo lives beside it, one
module per family, each class's docstring naming its source design and its parameter formula:
`projector_pooling.py` (identity, pooler, avgpool, pixel_shuffle, patch_merger), `projector_conv.py` (ldp, ldpv2,
c_abstractor), `projector_attention.py` (resampler, perceiver, tokenpacker, qformer); the base class and shared
helpers are in `projector_base.py`. `llava-kit projectors` lists token and parameter counts for given shapes.

Adding a projector: subclass `Projector`; its __init__ takes (vision_width, llm_width, grid, has_cls, *, options
with defaults), calls `super().__init__(vision_width, llm_width, grid, has_cls)` first, refuses inputs it cannot
take with `self.refuse(reason)` (e.g. a CLS token, an odd grid), and sets `self.num_output_tokens` if it changes the
token count; then add its name to PROJECTORS below. `build_projector` checks option names against the signature.
"""

import difflib
import inspect
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llava_kit.model.projector_attention import (
    PerceiverProjector,
    QFormerProjector,
    ResamplerProjector,
    TokenPackerProjector,
)
from llava_kit.model.projector_base import Projector, ProjectorError
from llava_kit.model.projector_base import is_positive_int as _is_positive_int
from llava_kit.model.projector_conv import CAbstractorProjector, LdpProjector, LdpV2Projector
from llava_kit.model.projector_pooling import (
    AvgPoolProjector,
    IdentityProjector,
    PatchMergerProjector,
    PixelShuffleProjector,
    PoolerProjector,
)

__all__ = ["PROJECTORS", "PROJECTOR_FAMILIES", "Projector", "ProjectorError", "build_projector", "count_parameters",
           "projector_names", "resolve_projector"]

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


# Exact names -> classes. The zoo's designs live in projector_pooling.py, projector_conv.py and
# projector_attention.py (each class's docstring names its source and its parameter formula).
PROJECTORS: dict[str, type[Projector]] = {
    "linear": LinearProjector,
    "identity": IdentityProjector,
    "pooler": PoolerProjector,
    "avgpool": AvgPoolProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "patch_merger": PatchMergerProjector,
    "ldp": LdpProjector,
    "ldpv2": LdpV2Projector,
    "c_abstractor": CAbstractorProjector,
    "resampler": ResamplerProjector,
    "perceiver": PerceiverProjector,
    "tokenpacker": TokenPackerProjector,
    "qformer": QFormerProjector,
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
    projector.options = dict(options)  # what the name does not say; saved in projector.json beside the weights
    return projector


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones counted once); only those with requires_grad if trainable_only."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _option_names(projector_class: type[Projector]) -> list[str]:
    """Keyword arguments of a projector's __init__ beyond the common ones."""
    parameters = inspect.signature(projector_class.__init__).parameters.values()
    return [p.name for p in parameters if p.name not in _COMMON_ARGUMENTS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
