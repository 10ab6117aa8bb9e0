"""The training data of the multimodal stages (pretrain, sft): records -> checked, encoded examples -> features.

    dataset = build_multimodal_dataset(cfg, model, tokenizer, device)

Reads the records in any format the stage takes (llava_kit/data/readers/), decodes every image and encodes every
conversation up front (bad records are skipped and reported, or stop the run: `data.bad_records`; over-long ones
follow `data.overlong`), through the token cache when `data.cache` is on; stops before step 1 when too few
records fit `data.max_seq_len`; then, with a frozen tower, attaches the feature cache (each image encoded once);
then packs samples when `data.packing`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llava_kit.config import RunConfig
from llava_kit.data.dataset import LlavaDataset, check_lengths, no_usable_records, prepare_examples
from llava_kit.data.encode import EncodeSettings
from llava_kit.data.feature_cache import FeatureCache, default_cache_root
from llava_kit.data.packing import PackedLlavaDataset
from llava_kit.data.readers import read_data
from llava_kit.data.readers.dataset_info import data_source
from llava_kit.data.token_cache import TokenCache, cache_key, file_fingerprint, tokenizer_fingerprint

logger = logging.getLogger(__name__)


def encode_settings(cfg: RunConfig, model, tokenizer) -> EncodeSettings:
    """The one tokenizer step as this run's config sets it (also what `llava-kit data check` uses)."""
    d = cfg.data
    return EncodeSettings(tokenizer, d.template, d.max_seq_len, d.overlong, d.system_prompt, model.image_token_id,
                          model.tokens_per_image, getattr(model, "anyres", None))


def build_dataset(cfg: RunConfig, model, tokenizer) -> LlavaDataset:
    """Read and encode the training data; bad records are skipped and reported, or stop the run.

    With `data.cache` (default) the encoded examples are cached, keyed by the data files' contents, the
    tokenizer and every setting the tokens depend on, so a rerun skips reading, checking and tokenising.
    Raises BadRecordError (no usable record) or OverlongError (too few fit max_seq_len), each with its report.
    """
    tower = model.vision_tower
    anyres = getattr(model, "anyres", None)
    image_settings = {"image_aspect": cfg.data.image_aspect, "image_preprocess": tower.preprocess,
                      "image_mean": tower.image_mean, "bad_records": cfg.data.bad_records, "anyres": anyres}

    def encode():
        result = read_data(cfg.data.path, cfg.data.format, cfg.stage)
        examples, report = prepare_examples(result.samples, encode_settings(cfg, model, tokenizer),
                                            cfg.data.image_root, cfg.data.bad_records, prior_bad=result.bad)
        report.formats = result.formats
        return LlavaDataset(examples, report, **image_settings)

    if cfg.data.cache:
        paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
        files = [file_fingerprint(f) for p in paths for f in data_source(p, cfg.data.format).files]
        # AnyRes counts each image's tokens from its size and the settings (the fixed strategy's key is unchanged)
        strategy = {"image_strategy": anyres.to_dict()} if anyres is not None else {}
        key = cache_key(stage="multimodal", files=files, entries=[p for p in paths if "#" in p], format=cfg.data.format,
                        stage_name=cfg.stage,
                        tokenizer=tokenizer_fingerprint(tokenizer), template=cfg.data.template,
                        system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len,
                        overlong=cfg.data.overlong, image_token_id=model.image_token_id,
                        tokens_per_image=model.tokens_per_image,
                        image_root=str(Path(cfg.data.image_root).resolve()), bad_records=cfg.data.bad_records,
                        **strategy)
        encoded, hit = TokenCache().get_or_build(key, lambda: encode().to_encoded())
        if hit:
            logger.info("data: tokenised examples read from the token cache (data.cache=false to re-encode)")
        dataset = LlavaDataset.from_encoded(encoded, **image_settings)
    else:
        dataset = encode()
    check_lengths(dataset.report, cfg.data.min_kept_fraction)  # first: its message says how to fit them
    if not dataset.examples:
        raise no_usable_records(dataset.report)
    return dataset


def attach_feature_cache(cfg: RunConfig, model, dataset: LlavaDataset, device: torch.device) -> None:
    """With a frozen tower, train from cached tower features (data/feature_cache.py) unless turned off."""
    tower = model.vision_tower
    if cfg.data.feature_cache == "off" or any(p.requires_grad for p in tower.parameters()):
        return
    if not dataset.image_paths:
        return
    cache = FeatureCache(cfg.data.feature_cache_dir or default_cache_root(), tower, cfg.data.image_aspect,
                         anyres=getattr(model, "anyres", None))
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
