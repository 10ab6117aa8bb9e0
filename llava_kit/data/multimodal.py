"""The training data of the multimodal stages (pretrain, sft): LLaVA records -> encoded examples -> features.

    dataset = build_multimodal_dataset(cfg, model, tokenizer, device)

Reads the records, checks every image and encodes every conversation up front (bad records are skipped and
reported, or stop the run: `data.bad_records`), through the token cache when `data.cache` is on; then, with a
frozen tower, attaches the feature cache (each image encoded once); then packs samples when `data.packing`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_kit.config import RunConfig
from llava_kit.data.dataset import LlavaDataset
from llava_kit.data.feature_cache import FeatureCache, default_cache_root
from llava_kit.data.formats import read_llava
from llava_kit.data.packing import PackedLlavaDataset
from llava_kit.data.token_cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def build_dataset(cfg: RunConfig, model, tokenizer) -> LlavaDataset:
    """Read and encode the training data; bad records are skipped and reported, or stop the run.

    With `data.cache` (default) the encoded examples are cached, keyed by the data files' contents, the
    tokenizer and every setting the tokens depend on, so a rerun skips reading, checking and tokenising.
    """
    tower = model.vision_tower
    image_settings = {"image_aspect": cfg.data.image_aspect, "image_preprocess": tower.preprocess,
                      "image_mean": tower.image_mean}

    def encode():
        result = read_llava(cfg.data.path)
        return LlavaDataset(
            result.samples, tokenizer, cfg.data.template, model.image_token_id, model.tokens_per_image,
            cfg.data.max_seq_len, image_root=cfg.data.image_root, system_prompt=cfg.data.system_prompt,
            bad_records=cfg.data.bad_records, prior_bad=result.bad, **image_settings)

    if not cfg.data.cache:
        return encode()
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    key = cache_key(stage="multimodal", files=[file_fingerprint(p) for p in paths],
                    tokenizer=tokenizer_fingerprint(tokenizer), template=cfg.data.template,
                    system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len,
                    image_token_id=model.image_token_id, tokens_per_image=model.tokens_per_image,
                    image_root=str(Path(cfg.data.image_root).resolve()), bad_records=cfg.data.bad_records)
    encoded, hit = TokenCache().get_or_build(key, lambda: encode().to_encoded())
    if hit:
        logger.info("data: tokenised examples read from the token cache (data.cache=false to re-encode)")
    return LlavaDataset.from_encoded(encoded, **image_settings)


def attach_feature_cache(cfg: RunConfig, model, dataset: LlavaDataset, device: torch.device) -> None:
    """With a frozen tower, train from cached tower features (data/feature_cache.py) unless turned off."""
    tower = model.vision_tower
    if cfg.data.feature_cache == "off" or any(p.requires_grad for p in tower.parameters()):
        return
    if not dataset.image_paths:
        return
    cache = FeatureCache(cfg.data.feature_cache_dir or default_cache_root(), tower, cfg.data.image_aspect)
    reader = cache.ensure(dataset.image_paths, tower, batch_size=max(cfg.train.micro_batch_size, 32),
                          num_workers=cfg.data.num_workers, device=device)
    dataset.use_feature_cache(reader)
    logger.info("training from cached tower features in %s (data.feature_cache=off to run the tower instead)",
                cache.dir)


def build_multimodal_dataset(cfg: RunConfig, model, tokenizer, device: torch.device):
    """The dataset a pretrain / sft run trains on: encoded, feature-cached where it can be, packed if asked."""
    dataset = build_dataset(cfg, model, tokenizer)
    attach_feature_cache(cfg, model, dataset, device)
    if cfg.data.packing:
        return PackedLlavaDataset(dataset, cfg.data.max_seq_len, seed=cfg.seed)
    return dataset
