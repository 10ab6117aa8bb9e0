"""Frozen-tower feature cache: encode each image once, train the projector from memory-mapped features.

With the tower frozen, its output for an image never changes, yet a plain LLaVA loop recomputes it on
every epoch and every rerun (learning-rate sweeps, projector comparisons). This cache stores the
tower's output (the chosen layer, after the select strategy: exactly what `VisionTower.encode`
returns) in fp16 `.npy` shards that training memory-maps.

Layout, under `root/<key>/` where `key` hashes everything the features depend on (the tower's
weights, architecture, feature layer, select strategy, image preprocessing, aspect policy):

    key.json                    what the key was made of (for humans)
    shard-<id>.npy              [n_images, num_tokens, width] float16 (AnyRes: [n_views, num_tokens, width])
    shard-<id>.json             {"images": [content hash, ...]} in row order; written last = shard complete
                                (AnyRes: also "views": [views per image], each image's rows one after the other)
    files.json                  path -> [size, mtime_ns, content hash], so reruns do not re-read every image
    lock                        flock: one process encodes, the others wait and then read

Images are keyed by the sha256 of their bytes, so a renamed or copied image hits the cache and an
edited one misses it. Under AnyRes every view of an image is cached (its base view and each tile, as the tower
encodes them one by one), and the key also holds the tile size and the pinpoints the tiles are cut for (not the
token caps: pooling happens after the projector). Several processes (torchrun ranks) may call `ensure` at once: the first
encodes what is missing under the lock, the rest find it done. DataLoader workers only read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from llava_kit.data.images import load_image, prepare_image

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: pad colour int(mean * 255) like LLaVA and transformers (was round)
FP16_MAX = 65504.0


def default_cache_root() -> Path:
    """`$LLAVA_KIT_HOME/feature_cache` (default `~/.cache/llava-kit/feature_cache`)."""
    home = os.environ.get("LLAVA_KIT_HOME", Path.home() / ".cache" / "llava-kit")
    return Path(home) / "feature_cache"


def tower_fingerprint(tower, image_aspect: str, anyres=None) -> dict:
    """Everything the cached features depend on, JSON-ready; its hash names the cache directory."""
    weights = hashlib.sha256()
    with tower.exclusive():  # another thread encoding with a truncated block list must not change what is hashed
        state = tower.state_dict()
    for name, tensor in sorted(state.items()):
        weights.update(name.encode())
        data = tensor.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
            data = data.view(torch.int16)
        weights.update(data.numpy().tobytes())
    processor = getattr(tower, "image_processor", None)
    preprocessing = processor.to_dict() if processor is not None else getattr(tower, "preprocess_cfg", None)
    geometry = {k: v for k, v in tower.describe().items() if k not in ("name_or_path", "pretrained")}
    fingerprint = {"version": CACHE_VERSION, "weights_sha256": weights.hexdigest(), "geometry": geometry,
                   "image_aspect": image_aspect, "preprocessing": json.loads(json.dumps(preprocessing, default=str))}
    if anyres is not None:  # the tiles an image is cut into (the fixed strategy's key is unchanged)
        fingerprint["anyres_tiles"] = {"tile_size": anyres.tile_size,
                                       "grid_pinpoints": [list(p) for p in anyres.pinpoints]}
    return fingerprint


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write(tmp)
    os.replace(tmp, path)


class _ImagesToEncode(Dataset):
    """Loads images exactly as training would (same aspect policy, same preprocessing; AnyRes: the same views)."""

    def __init__(self, paths: list[str], tower, image_aspect: str, anyres=None):
        self.paths, self.preprocess, self.mean, self.aspect = paths, tower.preprocess, tower.image_mean, image_aspect
        self.anyres = anyres

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.anyres is not None:  # [n_views, 3, H, W]: the base view, then the tiles
            return self.preprocess(self.anyres.views(load_image(self.paths[index])))
        image = prepare_image(load_image(self.paths[index]), self.aspect, self.mean)
        return self.preprocess([image])[0]  # [3, H, W]


def _views_batch(items: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """AnyRes images' views [n_views_i, 3, H, W] -> all of them [sum, 3, H, W] and each image's count."""
    return torch.cat(items), [len(i) for i in items]


class FeatureCache:
    """The features of one tower configuration; `ensure` fills it, `reader` reads it."""

    def __init__(self, root: str | Path, tower, image_aspect: str, anyres=None):
        self.fingerprint = tower_fingerprint(tower, image_aspect, anyres)
        self.dir = Path(root) / fingerprint_key(self.fingerprint)
        self.image_aspect = image_aspect
        self.anyres = anyres  # llava_kit.model.anyres.AnyRes (its `views`), or None: one view per image
        self.num_tokens, self.width = tower.num_tokens, tower.width

    @contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _index(self) -> dict[str, tuple]:
        """content hash -> (shard file name, row), or (shard, first row, views) for AnyRes shards, over every
        complete shard."""
        index = {}
        for meta in sorted(self.dir.glob("shard-*.json")):
            listing = json.loads(meta.read_text())
            shard = meta.with_suffix(".npy").name
            if "views" not in listing:
                for row, digest in enumerate(listing["images"]):
                    index[digest] = (shard, row)
                continue
            row = 0
            for digest, views in zip(listing["images"], listing["views"], strict=True):
                index[digest] = (shard, row, views)
                row += views
        return index

    def _content_hashes(self, paths: list[str]) -> dict[str, str]:
        """path -> sha256 of the file's bytes; unchanged files (same size and mtime) are not re-read."""
        known_file = self.dir / "files.json"
        known = json.loads(known_file.read_text()) if known_file.is_file() else {}
        hashes, changed = {}, False
        for path in paths:
            stat = os.stat(path)
            entry = known.get(path)
            if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
                hashes[path] = entry[2]
                continue
            hashes[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            known[path] = [stat.st_size, stat.st_mtime_ns, hashes[path]]
            changed = True
        if changed:
            _write_atomic(known_file, lambda tmp: tmp.write_text(json.dumps(known)))
        return hashes

    def ensure(self, paths: list[str], tower, *, batch_size: int = 32, num_workers: int = 0,
               device: str | torch.device = "cpu") -> FeatureReader:
        """Encode the images not cached yet (one process at a time); returns a reader for all of `paths`."""
        unique = sorted(set(paths))
        with self._locked():
            (self.dir / "key.json").write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True))
            hashes = self._content_hashes(unique)
            index = self._index()
            missing: dict[str, str] = {}  # one path per missing content hash
            for path in unique:
                if hashes[path] not in index:
                    missing.setdefault(hashes[path], path)
            logger.info("feature cache %s: %d image(s), %d cached, %d to encode", self.dir, len(unique),
                        len(unique) - len(missing), len(missing))
            if missing:
                self._encode(list(missing.values()), list(missing.keys()), tower, batch_size, num_workers, device)
                index = self._index()
        return FeatureReader(self.dir, {path: index[hashes[path]] for path in unique})

    def _encode(self, paths: list[str], digests: list[str], tower, batch_size: int, num_workers: int,
                device) -> None:
        anyres = self.anyres is not None
        loader = DataLoader(_ImagesToEncode(paths, tower, self.image_aspect, self.anyres), batch_size=batch_size,
                            num_workers=num_workers, **({"collate_fn": _views_batch} if anyres else {}))
        chunks, view_counts = [], []
        original_device = next(tower.parameters()).device
        tower.to(device)
        largest = 0.0
        with torch.no_grad():
            for batch in tqdm(loader, desc="encoding images (feature cache)", unit="batch"):
                pixel_values, counts = batch if anyres else (batch, None)
                out = tower.encode(pixel_values.to(device)).float()  # [batch (AnyRes: its views), num_tokens, width]
                largest = max(largest, float(out.abs().max()))
                chunks.append(out.clamp(-FP16_MAX, FP16_MAX).cpu().numpy().astype(np.float16))
                view_counts += counts or []
        features = np.concatenate(chunks) if chunks else np.empty((0, self.num_tokens, self.width), np.float16)
        tower.to(original_device)
        if largest > FP16_MAX:
            logger.warning("feature cache: tower outputs up to %.3g exceed float16 and were clipped to %g", largest,
                           FP16_MAX)
        name = f"shard-{uuid.uuid4().hex[:12]}"
        def write_features(tmp: Path) -> None:
            with open(tmp, "wb") as out:  # np.save on a path would append ".npy" to the temporary name
                np.save(out, features)

        _write_atomic(self.dir / f"{name}.npy", write_features)
        # The shard's image list is written last: a shard without it (a crash mid-write) is never read.
        listing = {"images": digests, **({"views": view_counts} if anyres else {})}
        _write_atomic(self.dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(listing)))


class FeatureReader:
    """Picklable lookup path -> features [num_tokens, width] (AnyRes: [n_views, num_tokens, width]); opens the memory
    maps lazily per process."""

    def __init__(self, directory: Path, locations: dict[str, tuple]):
        self.directory = Path(directory)
        self.locations = locations
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "locations": self.locations, "_maps": {}}

    def __contains__(self, path: str) -> bool:
        return path in self.locations

    def __call__(self, path: str) -> torch.Tensor:
        shard, row, *views = self.locations[path]
        if shard not in self._maps:
            self._maps[shard] = np.load(self.directory / shard, mmap_mode="r")
        if views:  # AnyRes: the image's rows, base view first
            return torch.from_numpy(np.array(self._maps[shard][row:row + views[0]]))  # [n_views, num_tokens, width]
        return torch.from_numpy(np.array(self._maps[shard][row]))  # [num_tokens, width] float16, a copy
