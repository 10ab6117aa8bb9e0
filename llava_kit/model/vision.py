"""Vision towers: transformers CLIP / SigLIP and open_clip ViTs behind one interface.

    tower = build_vision_tower("openai/clip-vit-large-patch14-336")            # hub id or local dir
    tower = build_vision_tower("ViT-L-14", pretrained="/ckpt/open_clip.bin")    # open_clip name + tag or file
    pixel_values = tower.preprocess(images)     # [batch, 3, image_size, image_size]
    features = tower.encode(pixel_values)       # [batch, num_tokens, width]

Layers are numbered the same way for every backend. `feature_layer` indexes the encoder's hidden states as
transformers returns them with `output_hidden_states=True`: L + 1 entries for L blocks, 0 = the embedding output
(after CLIP's pre-norm), k = the output of block k, -1 = the last block's output, -2 = the penultimate (LLaVA's
default). These are raw block outputs: the encoder's final norm (`post_layernorm` in transformers, `ln_post` in
open_clip) is never applied. A list of layers (e.g. [-2, -5, -8, -11], multi-layer features as TokenPacker reads
them) concatenates them channel-wise in list order: `width` is then the sum, len(list) x the encoder's width.

Preprocessing always resizes the *whole* image to image_size x image_size, never centre-crops: callers that want to
keep the aspect ratio pad to square first (with `tower.image_mean` as background, as LLaVA-1.5 does). On a square
image this gives the same pixels as the published processors (shortest-edge resize + centre crop, which then crops
nothing).
"""

import contextlib
import difflib
import json
import logging
import os
import threading
import weakref
from collections.abc import Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPImageProcessor,
    CLIPVisionModel,
    SiglipImageProcessor,
    SiglipVisionModel,
)

from llava_kit.errors import ModelLoadError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "open_clip")
SELECT_STRATEGIES = ("patch", "full")

# A directory holding this file is an open_clip tower: ours (written by save_pretrained, vision weights only) or
# open_clip's own hub layout (full CLIP weights). The name is open_clip's, so its `local-dir:` loader reads it too.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_VISION_WEIGHTS = "open_clip_vision.safetensors"

# transformers model_type -> (vision model class, fallback image processor class, has a leading CLS token).
# Full checkpoints (CLIPModel, SiglipModel) load through the vision class too: it reads `vision_config` and only
# the vision weights (the text tower's weights are skipped).
TRANSFORMERS_FAMILIES = {
    "clip": (CLIPVisionModel, CLIPImageProcessor, True),
    "clip_vision_model": (CLIPVisionModel, CLIPImageProcessor, True),
    "siglip": (SiglipVisionModel, SiglipImageProcessor, False),
    "siglip_vision_model": (SiglipVisionModel, SiglipImageProcessor, False),
}


_TOWER_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOWER_LOCKS_GUARD = threading.Lock()


def tower_lock(tower: nn.Module) -> threading.RLock:
    """The lock a thread holds while the tower's modules are not as saved (see `_blocks_up_to`); hold it to read
    the whole tower (its state dict) while other threads may encode with it. Kept outside the module, so towers
    still pickle (DataLoader workers)."""
    with _TOWER_LOCKS_GUARD:
        lock = _TOWER_LOCKS.get(tower)
        if lock is None:
            lock = _TOWER_LOCKS[tower] = threading.RLock()
        return lock


class VisionTowerError(ModelLoadError):
    """A vision tower cannot be built or used as asked; the message says what to change."""


class VisionTower(nn.Module):
    """Frozen-or-trainable image encoder returning patch features of one chosen layer.

    Subclasses (one per backend) load the encoder and implement `preprocess`, `_layer_tokens` and
    `save_pretrained`; the layer choice and CLS handling live here so both backends agree.
    """

    def __init__(self, *, backend: str, name_or_path: str, pretrained: str | None, width: int, image_size: int,
                 grid: tuple[int, int], has_cls: bool, num_layers: int, feature_layer: int | list[int],
                 select_strategy: str,
                 image_mean: Sequence[float]):
        super().__init__()
        check_feature_layer(feature_layer, num_layers)
        check_select_strategy(select_strategy)
        self.backend = backend
        self.name_or_path = name_or_path
        self.pretrained = pretrained
        layers = feature_layer if isinstance(feature_layer, list | tuple) else [feature_layer]
        self.layer_width = width  # one layer's channels
        self.width = width * len(layers)  # [batch, tokens, width]: the chosen layers side by side
        self.image_size = image_size
        self.grid = (int(grid[0]), int(grid[1]))
        self.has_cls = has_cls
        self.num_layers = num_layers
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.image_mean = tuple(float(m) for m in image_mean)
        # The same layers as absolute hidden-states indices: 0 = embedding output, k = output of block k.
        self.hidden_indices = tuple(layer % (num_layers + 1) for layer in layers)
        keeps_cls = has_cls and select_strategy == "full"
        self.num_tokens = self.grid[0] * self.grid[1] + int(keeps_cls)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> [batch, 3, image_size, image_size] float32, normalised as the encoder expects."""
        raise NotImplementedError

    def _layer_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen layers (concatenated channel-wise, in `feature_layer` order) split as (prefix, patches):
        [batch, 1 or 0, width] (the CLS token, if any) and [batch, rows*cols, width]."""
        raise NotImplementedError

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write weights (safetensors), architecture and preprocessing to `out_dir`; `build_vision_tower(out_dir)`
        rebuilds this tower exactly, without the original name or path. `state_dict` (named as in this tower's
        `state_dict()`) replaces the live weights, e.g. gathered whole from ZeRO-3 partitions."""
        raise NotImplementedError

    def exclusive(self) -> threading.RLock:
        """Hold this (`with tower.exclusive():`) to read the whole tower while other threads may encode with it: an
        encode changes the module list for its duration (TransformersVisionTower._blocks_up_to)."""
        return tower_lock(self)

    def to_config(self) -> dict:
        """Everything `vision_tower_from_config` needs to rebuild this tower's architecture and preprocessing
        (JSON-ready, no weights): stored in a composite model's config so `from_pretrained` can build it."""
        raise NotImplementedError

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[batch, 3, image_size, image_size] -> features [batch, num_tokens, width] of `feature_layer` (a list:
        its layers side by side).

        No `torch.no_grad` here: the caller decides whether the tower is trained.
        """
        expected = (3, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise VisionTowerError(
                f"encode() expects pixel values of shape [batch, {', '.join(map(str, expected))}], got "
                f"{list(pixel_values.shape)}; make them with tower.preprocess(images)")
        parameter = next(self.parameters())
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        prefix, patches = self._layer_tokens(pixel_values)  # [batch, 0|1, width], [batch, rows*cols, width]
        if self.select_strategy == "full":
            return torch.cat([prefix, patches], dim=1)  # [batch, (1 +) rows*cols, width]
        return patches

    def describe(self) -> dict:
        """Provenance and geometry, JSON-ready: where the weights came from and what encode() returns."""
        return {
            "backend": self.backend,
            "name_or_path": self.name_or_path,
            "pretrained": self.pretrained,
            "feature_layer": self.feature_layer,
            "select_strategy": self.select_strategy,
            "image_size": self.image_size,
            "grid": list(self.grid),
            "width": self.width,
            "has_cls": self.has_cls,
            "num_layers": self.num_layers,
            "num_tokens": self.num_tokens,
        }


# --------------------------------------------------------------------------------------------------------------
# transformers: CLIP and SigLIP
# --------------------------------------------------------------------------------------------------------------

class TransformersVisionTower(VisionTower):
    """A transformers `CLIPVisionModel` or `SiglipVisionModel` with its image processor."""

    def __init__(self, vision_model: nn.Module, image_processor, *, name_or_path: str, has_cls: bool,
                 feature_layer: int, select_strategy: str):
        config = vision_model.config
        side = config.image_size // config.patch_size
        super().__init__(backend="transformers", name_or_path=name_or_path, pretrained=None,
                         width=config.hidden_size, image_size=config.image_size, grid=(side, side), has_cls=has_cls,
                         num_layers=config.num_hidden_layers, feature_layer=feature_layer,
                         select_strategy=select_strategy, image_mean=image_processor.image_mean)
        self.vision_model = vision_model
        self.image_processor = image_processor

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> [batch, 3, image_size, image_size] float32 via the checkpoint's image processor."""
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        batch = self.image_processor(images=[_as_rgb(image) for image in images], return_tensors="pt")
        return batch["pixel_values"].to(torch.float32)

    def _layer_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._blocks_up_to(max(self.hidden_indices)):
            outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        # hidden_states: num_layers + 1 tensors [batch, n_prefix + rows*cols, width]; [0] = embeddings, [k] = block k
        # output. SigLIP's last_hidden_state has post_layernorm applied, hidden_states[-1] does not.
        hidden = torch.cat([outputs.hidden_states[i] for i in self.hidden_indices], dim=-1)  # layers side by side
        n_prefix = 1 if self.has_cls else 0  # SigLIP has no CLS token: never slice a token off there
        return hidden[:, :n_prefix], hidden[:, n_prefix:]

    @contextlib.contextmanager
    def _blocks_up_to(self, last_block: int):
        """Run only the encoder blocks up to `last_block` (1-based) inside this context.

        Blocks after the deepest chosen layer cannot change the features (LLaVA's layer -2 leaves the last one
        unused; vLLM builds its llava towers without it): skipping them saves their compute in every encode, in
        training and chat alike, and the weights stay in the module, so saving and export are unchanged. Blocks
        skipped this way get no gradient either way.
        """
        encoder = getattr(self.vision_model, "encoder", None)
        layers = getattr(encoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or last_block >= len(layers):
            yield
            return
        # The swap changes the module for as long as the forward runs: other threads reading this tower (its
        # weights' fingerprint, a save, another encode) wait on the tower's lock (`tower_lock`) meanwhile.
        with tower_lock(self):
            # A ModuleList of the same block modules; at least one block, since transformers records
            # hidden_states[0] (the embeddings) as the first block's input.
            encoder.layers = layers[:max(last_block, 1)]
            try:
                yield
            finally:
                encoder.layers = layers

    def to_config(self) -> dict:
        return {"backend": "transformers", "model_config": self.vision_model.config.to_dict(),
                "image_processor": self.image_processor.to_dict(), "has_cls": self.has_cls,
                "feature_layer": self.feature_layer, "select_strategy": self.select_strategy,
                "name_or_path": self.name_or_path}

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write a plain transformers checkpoint: config.json, model.safetensors, preprocessor_config.json."""
        if state_dict is not None:
            state_dict = {k.removeprefix("vision_model."): v for k, v in state_dict.items()}
        self.vision_model.save_pretrained(out_dir, state_dict=state_dict)
        self.image_processor.save_pretrained(out_dir)


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be a filesystem path (hub ids are `name` or `org/name`)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _load_transformers_config(name_or_path: str):
    """AutoConfig for a local dir or hub id, with errors that say which of the two failed and how to fix it."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            hint = (f"; it holds {OPEN_CLIP_CONFIG}, so load it with backend='open_clip' (or 'auto')"
                    if os.path.isfile(os.path.join(name_or_path, OPEN_CLIP_CONFIG)) else "")
            raise VisionTowerError(f"{name_or_path!r} has no config.json: not a transformers checkpoint{hint}")
    elif os.path.exists(name_or_path):
        raise VisionTowerError(
            f"{name_or_path!r} is a file; a transformers vision tower is a directory (config.json + weights). "
            "For an open_clip checkpoint file use backend='open_clip' with the model name and pretrained=<file>.")
    elif _looks_like_path(name_or_path):
        raise VisionTowerError(f"vision tower path not found: {name_or_path!r} (absolute: "
                               f"{os.path.abspath(os.path.expanduser(name_or_path))})")
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise VisionTowerError(
            f"cannot load vision tower {name_or_path!r}: no such local directory, and the Hugging Face Hub did not "
            f"provide it ({err}). Without network access, download it elsewhere (`hf download {name_or_path} "
            f"--local-dir DIR`) and pass DIR; if it is already in the local cache, set HF_HUB_OFFLINE=1.") from None


class _DropLoadReport(logging.Filter):
    """Hides transformers' "LOAD REPORT" warning, which lists a full checkpoint's skipped text-tower weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _build_transformers_tower(name_or_path: str, feature_layer: int, select_strategy: str) -> TransformersVisionTower:
    config = _load_transformers_config(name_or_path)
    if config.model_type not in TRANSFORMERS_FAMILIES:
        raise VisionTowerError(
            f"{name_or_path!r} is a {config.model_type!r} model; supported transformers vision towers are "
            f"{', '.join(TRANSFORMERS_FAMILIES)} (CLIP and SigLIP, full or vision-only checkpoints)")
    model_class, processor_class, has_cls = TRANSFORMERS_FAMILIES[config.model_type]
    vision_config = getattr(config, "vision_config", config)
    check_feature_layer(feature_layer, vision_config.num_hidden_layers)  # before loading the weights: fail fast

    # Loaded in float32 whatever the checkpoint's dtype (transformers 5 would keep it): callers cast with .to().
    # Our filter replaces transformers' report: text-tower keys are expected to be skipped; a missing vision key
    # is an error here (it would otherwise be silently random).
    modeling_logger = logging.getLogger("transformers.modeling_utils")
    load_report_filter = _DropLoadReport()
    modeling_logger.addFilter(load_report_filter)
    try:
        vision_model, loading_info = model_class.from_pretrained(name_or_path, dtype=torch.float32,
                                                                 output_loading_info=True)
    finally:
        modeling_logger.removeFilter(load_report_filter)
    if loading_info["missing_keys"]:
        raise VisionTowerError(f"{name_or_path!r} lacks vision weights {sorted(loading_info['missing_keys'])[:8]}; "
                               "the checkpoint does not match its config.json")
    if loading_info["unexpected_keys"]:
        logger.info("vision tower %s: skipped %d non-vision weights", name_or_path,
                    len(loading_info["unexpected_keys"]))
    vision_model.eval()

    image_processor = _load_square_processor(name_or_path, processor_class, vision_config.image_size)
    return TransformersVisionTower(vision_model, image_processor, name_or_path=name_or_path, has_cls=has_cls,
                                   feature_layer=feature_layer, select_strategy=select_strategy)


def _load_square_processor(name_or_path: str, fallback_class, image_size: int):
    """The checkpoint's image processor, set to resize the whole image to image_size x image_size, no centre crop.

    CLIP's processor resizes the shortest edge and centre-crops, which cuts off the sides of a non-square image; on a
    square image (LLaVA pads to square first) the square resize gives the same pixels. The model's image_size wins
    over the processor's, since the position embeddings fix it.
    """
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except OSError:
        logger.warning("%s has no preprocessor_config.json: using %s defaults (mean/std of the original models)",
                       name_or_path, fallback_class.__name__)
        processor = fallback_class()
    overrides = {"size": {"height": image_size, "width": image_size}}
    if getattr(processor, "do_center_crop", None) is not None:
        overrides["do_center_crop"] = False
    # Rebuilt through from_dict so the processor validates the new size itself (it becomes a SizeDict).
    return _pil_variant(type(processor)).from_dict({**processor.to_dict(), **overrides})


def _pil_variant(processor_class: type) -> type:
    """The PIL-backed twin of a transformers image processor class, when there is one.

    In transformers 5 the default processors run on torchvision; on CPU they cost ~8 ms per small image,
    the PIL ones ~0.5 ms (measured on 64-256 px images at 32 px). Same resize/normalise steps; pixel values
    differ only by resampling antialias details.
    """
    import transformers

    name = processor_class.__name__.removesuffix("Fast")
    return getattr(transformers, f"{name}Pil", processor_class)


# --------------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------------

class OpenClipVisionTower(VisionTower):
    """The `visual` part of an open_clip model (its native ViT, or a timm ViT trunk) with its transform.

    What open_clip 3.3 returns, verified against a manual pass through the blocks (see tests/unit/test_vision.py):
    `visual.forward_intermediates(x, indices=[i], output_fmt='NLC', intermediates_only=True,
    output_extra_tokens=True)` gives `image_intermediates[0]` = the patch tokens of block i's output
    [batch, rows*cols, width] and `image_intermediates_prefix[0]` = its CLS token [batch, 1, width], split off from
    the front of the sequence; block outputs are taken *before* `ln_post` (normalize_intermediates=False). So our
    hidden-states index k >= 1 is open_clip block k - 1; index 0 (the embedding output after `ln_pre`) is
    `visual._embeds(x)`. An integer `indices` means "the last n blocks" there, so a one-element list is passed.
    """

    def __init__(self, visual: nn.Module, *, model_cfg: dict, preprocess_cfg: dict, model_name: str,
                 name_or_path: str, pretrained: str | None, feature_layer: int, select_strategy: str):
        import open_clip  # heavy import (timm, torchvision), only for this backend

        geometry = _open_clip_geometry(visual, name_or_path)
        super().__init__(backend="open_clip", name_or_path=name_or_path, pretrained=pretrained,
                         width=geometry["width"], image_size=geometry["image_size"], grid=geometry["grid"],
                         has_cls=geometry["n_prefix"] == 1, num_layers=geometry["num_layers"],
                         feature_layer=feature_layer, select_strategy=select_strategy,
                         image_mean=preprocess_cfg["mean"])
        if geometry["is_timm"] and 0 in self.hidden_indices:
            raise VisionTowerError(
                f"feature_layer={feature_layer} selects the embedding output, which timm-based open_clip towers "
                f"({name_or_path}) do not expose; choose a block output: 1..{self.num_layers} or "
                f"-1..-{self.num_layers}")
        # LLaVA needs every patch token, in training mode too: open_clip's patch dropout would drop some.
        if geometry["is_timm"]:
            visual.trunk.patch_drop = nn.Identity()
        else:
            visual.patch_dropout = nn.Identity()
        self.visual = visual
        self.model_name = model_name
        self.model_cfg = model_cfg
        # Whole image squashed to a square (resize_mode 'squash'), no centre crop: see the module docstring.
        self.preprocess_cfg = {**preprocess_cfg, "size": self.image_size, "resize_mode": "squash"}
        self.image_processor = None  # no transformers processor: open_clip's own transform below
        cfg = self.preprocess_cfg
        self.transform = open_clip.image_transform(cfg["size"], is_train=False, mean=tuple(cfg["mean"]),
                                                   std=tuple(cfg["std"]), resize_mode="squash",
                                                   interpolation=cfg.get("interpolation", "bicubic"),
                                                   fill_color=cfg.get("fill_color", 0))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> [batch, 3, image_size, image_size] float32 via open_clip's eval transform."""
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size)
        return torch.stack([self.transform(_as_rgb(image)) for image in images]).to(torch.float32)

    def _layer_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # hidden index -> (prefix, patches)
        if 0 in self.hidden_indices:
            tokens = self.visual._embeds(pixel_values)  # [batch, 1 + rows*cols, width], after ln_pre
            layers[0] = (tokens[:, :1], tokens[:, 1:])
        blocks = sorted({index - 1 for index in self.hidden_indices if index > 0})  # open_clip block numbers
        if blocks:
            out = self.visual.forward_intermediates(
                pixel_values, indices=blocks, stop_early=True, output_fmt="NLC", intermediates_only=True,
                output_extra_tokens=True)
            # Intermediates come in block order, i.e. in the sorted order asked for.
            for block, patches, prefix in zip(blocks, out["image_intermediates"],
                                              out.get("image_intermediates_prefix") or [None] * len(blocks),
                                              strict=True):
                # patches [batch, rows*cols, width]; prefix [batch, 1 or 0, width]
                layers[block + 1] = (patches[:, :0] if prefix is None else prefix, patches)
        prefix = torch.cat([layers[i][0] for i in self.hidden_indices], dim=-1)
        patches = torch.cat([layers[i][1] for i in self.hidden_indices], dim=-1)
        return prefix, patches

    def to_config(self) -> dict:
        return {"backend": "open_clip", "model_name": self.model_name, "model_cfg": self.model_cfg,
                "preprocess_cfg": self.preprocess_cfg, "feature_layer": self.feature_layer,
                "select_strategy": self.select_strategy, "name_or_path": self.name_or_path,
                "pretrained": self.pretrained}

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write open_clip_config.json (architecture + preprocessing) and the vision weights (safetensors)."""
        os.makedirs(out_dir, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        state = {k.removeprefix("visual."): v.contiguous() for k, v in state_dict.items()}
        save_file(state, os.path.join(out_dir, OPEN_CLIP_VISION_WEIGHTS))
        # Same layout as open_clip's hub configs (model_cfg, preprocess_cfg), so open_clip tools can read it.
        config = {"model_name": self.model_name, "model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg}
        with open(os.path.join(out_dir, OPEN_CLIP_CONFIG), "w") as f:
            json.dump(config, f, indent=2)


def _open_clip_geometry(visual: nn.Module, name: str) -> dict:
    """Width, depth, image size, grid and prefix-token count of an open_clip ViT (native or timm trunk)."""
    trunk = getattr(visual, "trunk", None)
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):  # open_clip's own VisionTransformer
        sizes, grid = tuple(visual.image_size), tuple(visual.grid_size)
        geometry = {"width": visual.transformer.width, "num_layers": len(visual.transformer.resblocks),
                    "n_prefix": 1, "is_timm": False}
    elif trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):  # timm ViT
        sizes, grid = tuple(trunk.patch_embed.img_size), tuple(trunk.patch_embed.grid_size)
        geometry = {"width": trunk.embed_dim, "num_layers": len(trunk.blocks),
                    "n_prefix": trunk.num_prefix_tokens, "is_timm": True}
    else:
        raise VisionTowerError(f"open_clip model {name!r} has a {type(visual).__name__} image tower without patch "
                               "tokens; use a ViT model (e.g. ViT-B-16, ViT-L-14)")
    if sizes[0] != sizes[1]:
        raise VisionTowerError(f"open_clip model {name!r} takes {sizes[0]}x{sizes[1]} images; only square inputs "
                               "are supported")
    if geometry["n_prefix"] > 1:
        raise VisionTowerError(f"open_clip model {name!r} has {geometry['n_prefix']} prefix tokens (register "
                               "tokens); only a single CLS token or none is supported")
    return {**geometry, "image_size": sizes[0], "grid": grid}


def _build_open_clip_tower(name_or_path: str, pretrained: str | None, feature_layer: int,
                           select_strategy: str) -> OpenClipVisionTower:
    import open_clip  # heavy import (timm, torchvision), only for this backend

    if os.path.isdir(name_or_path):
        return _load_open_clip_dir(name_or_path, pretrained, feature_layer, select_strategy)
    if _looks_like_path(name_or_path) or os.path.exists(name_or_path):
        raise VisionTowerError(
            f"open_clip: {name_or_path!r} is not a directory; pass a model name (e.g. ViT-B-32) with "
            "pretrained=<tag or checkpoint file>, or a directory written by save_pretrained")
    from_hub = name_or_path.startswith("hf-hub:")  # open_clip fetches config and weights from the Hub itself
    name = name_or_path if from_hub else name_or_path.replace("/", "-")  # open_clip's own normalisation
    if not from_hub and name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        raise VisionTowerError(
            f"unknown open_clip model {name_or_path!r}; close names: {', '.join(close) or 'none'} "
            "(all: open_clip.list_models()). A custom architecture is registered with "
            "open_clip.add_model_config('path/NAME.json').")

    tag_cfg = {}
    if pretrained and not from_hub:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise VisionTowerError(
                f"open_clip pretrained={pretrained!r} is neither a known tag of {name} (tags: "
                f"{', '.join(tags) or 'none'}) nor an existing checkpoint file")
    model_cfg = None if from_hub else open_clip.get_model_config(name)  # architecture, a dict
    layers = (model_cfg or {}).get("vision_cfg", {}).get("layers")  # a list for ResNets, absent for timm
    if isinstance(layers, int) and "timm_model_name" not in model_cfg["vision_cfg"]:
        check_feature_layer(feature_layer, layers)  # before loading the weights: fail fast
    # Some tags (e.g. OpenAI's) were trained with QuickGELU while the plain config says GELU; open_clip only warns
    # about the mismatch and builds GELU, which gives wrong features. Build what the weights were trained with.
    force_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    try:
        model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=force_quick_gelu,
                                       pretrained_text=False)
    except (RuntimeError, OSError, ValueError) as err:
        raise VisionTowerError(
            f"open_clip could not build {name_or_path!r} with pretrained={pretrained!r}: {str(err).rstrip('.')}. "
            "Without network access, download the checkpoint elsewhere and pass its file path as pretrained=...",
        ) from None
    if model_cfg is None:
        model_cfg = open_clip.get_model_config(name)  # hf-hub: in the local cache now
    if force_quick_gelu:
        model_cfg["quick_gelu"] = True
    return OpenClipVisionTower(model.visual, model_cfg=model_cfg, preprocess_cfg=dict(model.visual.preprocess_cfg),
                               model_name=name, name_or_path=name_or_path, pretrained=pretrained,
                               feature_layer=feature_layer, select_strategy=select_strategy)


def _load_open_clip_dir(path: str, pretrained: str | None, feature_layer: int,
                        select_strategy: str) -> OpenClipVisionTower:
    """A directory with open_clip_config.json: ours (vision weights only) or open_clip's hub layout (full model)."""
    import open_clip

    config_path = os.path.join(path, OPEN_CLIP_CONFIG)
    if not os.path.isfile(config_path):
        raise VisionTowerError(f"{path!r} has no {OPEN_CLIP_CONFIG}: not an open_clip tower directory "
                               "(use backend='transformers' for a transformers checkpoint)")
    if pretrained:
        raise VisionTowerError(f"pretrained={pretrained!r} given with the directory {path!r}: a directory carries "
                               "its own weights; drop pretrained")
    with open(config_path) as f:
        config = json.load(f)
    if "model_cfg" not in config:
        raise VisionTowerError(f"{config_path} lacks 'model_cfg'; it was not written by save_pretrained or open_clip")
    model_cfg = config["model_cfg"]
    weights_path = os.path.join(path, OPEN_CLIP_VISION_WEIGHTS)
    if os.path.isfile(weights_path):
        # Ours: build only the image tower, then load its weights strictly.
        visual = _open_clip_visual(model_cfg)
        try:
            visual.load_state_dict(load_file(weights_path), strict=True)
        except RuntimeError as err:
            raise VisionTowerError(f"{weights_path} does not match {config_path}: {err}") from None
        preprocess_cfg = config.get("preprocess_cfg", {})
    else:
        try:
            visual = open_clip.create_model(f"local-dir:{path}", pretrained_text=False).visual
        except (RuntimeError, OSError, ValueError) as err:
            raise VisionTowerError(f"open_clip could not load the directory {path!r}: {err}") from None
        preprocess_cfg = dict(visual.preprocess_cfg)
    preprocess_cfg = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD, **preprocess_cfg}
    visual.eval()
    return OpenClipVisionTower(visual, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg,
                               model_name=config.get("model_name", os.path.basename(os.path.normpath(path))),
                               name_or_path=path, pretrained=None, feature_layer=feature_layer,
                               select_strategy=select_strategy)


def _open_clip_visual(model_cfg: dict) -> nn.Module:
    """open_clip's image tower for an architecture config, randomly initialised (open_clip's create_model would also
    build a text tower and warn that the model is random)."""
    from open_clip.model import _build_vision_tower

    vision_cfg = {**model_cfg["vision_cfg"], "timm_model_pretrained": False}  # never fetch ImageNet weights
    return _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))


# --------------------------------------------------------------------------------------------------------------
# The entry points
# --------------------------------------------------------------------------------------------------------------

def vision_tower_from_config(config: dict) -> VisionTower:
    """The tower `VisionTower.to_config()` describes, with random weights (a composite's `from_pretrained` then loads
    them); built on the meta device when called under `torch.device("meta")`."""
    import transformers

    backend = config.get("backend")
    if backend == "transformers":
        model_config = AutoConfig.for_model(**config["model_config"])
        model_class, _, _ = TRANSFORMERS_FAMILIES[model_config.model_type]
        processor_config = dict(config["image_processor"])
        processor_class = getattr(transformers, processor_config.get("image_processor_type", ""), None) \
            or CLIPImageProcessor
        return TransformersVisionTower(model_class(model_config).eval(), processor_class.from_dict(processor_config),
                                       name_or_path=config["name_or_path"], has_cls=config["has_cls"],
                                       feature_layer=config["feature_layer"],
                                       select_strategy=config["select_strategy"])
    if backend == "open_clip":
        return OpenClipVisionTower(_open_clip_visual(config["model_cfg"]).eval(), model_cfg=config["model_cfg"],
                                   preprocess_cfg=config["preprocess_cfg"], model_name=config["model_name"],
                                   name_or_path=config["name_or_path"], pretrained=config.get("pretrained"),
                                   feature_layer=config["feature_layer"], select_strategy=config["select_strategy"])
    raise VisionTowerError(f"unknown vision backend {backend!r} in a saved model config; this llava-kit reads "
                           "'transformers' and 'open_clip' towers (was the model written by a newer version?)")


def build_vision_tower(name_or_path: str, backend: str = "auto", feature_layer: int | list[int] = -2,
                       select_strategy: str = "patch", pretrained: str | None = None) -> VisionTower:
    """Load a vision tower.

    name_or_path: a transformers CLIP/SigLIP hub id or local directory; an open_clip model name (with `pretrained`
        a tag or a checkpoint file); or a directory written by `VisionTower.save_pretrained`.
    backend: "transformers", "open_clip", or "auto": open_clip for a directory holding open_clip_config.json, an
        `hf-hub:` name or a registered open_clip model name (no "/", e.g. ViT-B-32); otherwise transformers.
    feature_layer: hidden-states index, -1 = last block output, -2 = penultimate (LLaVA's default); 0 = embeddings;
        or a list of them, concatenated channel-wise in list order (width = len(list) x the encoder's width).
    select_strategy: "patch" drops the CLS token where there is one; "full" keeps every token.
    """
    if not isinstance(name_or_path, str | os.PathLike) or not str(name_or_path):
        raise VisionTowerError(f"name_or_path must be a non-empty string, got {name_or_path!r}")
    name_or_path = str(name_or_path)
    if backend not in BACKENDS:
        raise VisionTowerError(f"unknown vision backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    check_select_strategy(select_strategy)
    check_feature_layer(feature_layer, None)  # the type; the range once the encoder's depth is known
    if backend == "auto":
        backend = "open_clip" if _is_open_clip_name(name_or_path) else "transformers"
    if backend == "open_clip":
        return _build_open_clip_tower(name_or_path, pretrained, feature_layer, select_strategy).eval()
    if pretrained is not None:
        raise VisionTowerError(f"pretrained={pretrained!r} only applies to open_clip models; a transformers "
                               "checkpoint brings its weights with name_or_path")
    return _build_transformers_tower(name_or_path, feature_layer, select_strategy).eval()


def _is_open_clip_name(name_or_path: str) -> bool:
    """What backend="auto" treats as open_clip: its directories, `hf-hub:` names, and its registered model names."""
    if os.path.isdir(name_or_path):
        return os.path.isfile(os.path.join(name_or_path, OPEN_CLIP_CONFIG))
    if name_or_path.startswith("hf-hub:"):
        return True
    if "/" in name_or_path or os.path.exists(name_or_path):  # hub ids are org/name; open_clip names have no "/"
        return False
    import open_clip  # heavy import (timm, torchvision), only for this check

    return name_or_path in open_clip.list_models()


def check_feature_layer(feature_layer: int | list[int], num_layers: int | None) -> None:
    """Raise VisionTowerError unless `feature_layer` (an index or a non-empty list of them) indexes the
    num_layers + 1 hidden states; num_layers None checks the type only."""
    if isinstance(feature_layer, list | tuple):
        if not feature_layer:
            raise VisionTowerError("feature_layer is an empty list; give one layer (-2) or several ([-2, -5, -8])")
        for layer in feature_layer:
            check_feature_layer(layer, num_layers)
        return
    if not isinstance(feature_layer, int) or isinstance(feature_layer, bool):
        raise VisionTowerError(f"feature_layer must be an integer (e.g. -2) or a list of them, got {feature_layer!r}")
    if num_layers is not None and not -(num_layers + 1) <= feature_layer <= num_layers:
        raise VisionTowerError(
            f"feature_layer={feature_layer} is out of range for a {num_layers}-block encoder: use "
            f"{-(num_layers + 1)}..{num_layers} (-1 = last block output, -2 = penultimate, 0 = embeddings)")


def check_select_strategy(select_strategy: str) -> None:
    """Raise VisionTowerError unless `select_strategy` is "patch" or "full"."""
    if select_strategy in SELECT_STRATEGIES:
        return
    hint = ""
    if select_strategy == "default":
        hint = " ('default' is transformers' LlavaConfig name for 'patch')"
    elif isinstance(select_strategy, str):
        close = difflib.get_close_matches(select_strategy, SELECT_STRATEGIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise VisionTowerError(f"unknown select_strategy {select_strategy!r}{hint}; choose 'patch' (drop the CLS token "
                           "where there is one) or 'full' (keep every token)")


def _as_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")
