"""A benchmark score during training (train.eval_benchmark): the model being trained answers a small subset.

    train:
      eval_benchmark: {name: pope, data: pope/coco_pope_random.json, image_root: coco/val2014, limit: 50}

At every evaluation (train.eval_steps, with the held-out loss) the current weights answer the subset greedily through
the generation service, the same prompts and scoring as `llava-kit eval`; the headline metric and the others are
logged as `eval_<benchmark>_<metric>` (metrics.jsonl, TensorBoard). Off by default: generation costs far more than
a loss.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava_kit.benchmarks import get_benchmark, open_image
from llava_kit.config import RunConfig
from llava_kit.errors import LlavaKitError
from llava_kit.inference.sampling import SamplingParams
from llava_kit.inference.service import GenerationRequest, GenerationService

logger = logging.getLogger(__name__)


class BenchmarkProbe:
    """Scores a model on the subset of `cfg.train.eval_benchmark`; the items are read once, before step 1."""

    def __init__(self, cfg: RunConfig, tokenizer, modality, batch_size: int = 16):
        spec = cfg.train.eval_benchmark
        self.benchmark = get_benchmark(spec.name)
        image_root = Path(spec.image_root) if spec.image_root else None
        self.items = self.benchmark.read(Path(spec.data), image_root, spec.limit)  # a bad file stops before step 1
        self.params = SamplingParams(max_new_tokens=spec.max_new_tokens)
        self.settings = modality.inference_settings(cfg)
        self.tokenizer, self.modality, self.batch_size = tokenizer, modality, batch_size
        logger.info("eval_benchmark: %s, %d prompts from %s at every evaluation", spec.name, len(self.items),
                    spec.data)

    def __call__(self, model) -> dict[str, float]:
        """{eval_<benchmark>_<metric>: value} of `model` now (put back in training mode after)."""
        was_training = model.training
        model.eval()  # no dropout (LoRA's included) while answering
        try:
            predictions = self._answer(GenerationService(model, self.tokenizer, self.settings, self.modality))
        finally:
            model.train(was_training)
        scores = self.benchmark.score(self.items, predictions)
        prefix = f"eval_{self.benchmark.name}_"
        logger.info("eval_benchmark %s: %s %.4f", self.benchmark.name, self.benchmark.headline,
                    scores.metrics[self.benchmark.headline])
        return {prefix + name: value for name, value in scores.metrics.items()}

    def _answer(self, service: GenerationService) -> list[str]:
        # The loop of llava_kit/eval/answering.py, which this layer cannot import (eval and train are one layer):
        # an item that cannot be asked counts as answered "".
        predictions = [""] * len(self.items)
        for start in range(0, len(self.items), self.batch_size):
            requests, asked = [], []
            for i in range(start, min(start + self.batch_size, len(self.items))):
                item = self.items[i]
                try:
                    prompt = service.prepare(item.messages(), [open_image(source) for source in item.images])
                except LlavaKitError as err:
                    logger.warning("eval_benchmark: item %s cannot be asked (%s)", item.id, err)
                    continue
                requests.append(GenerationRequest(prompt, self.params))
                asked.append(i)
            for i, completion in zip(asked, service.generate(requests) if requests else [], strict=True):
                predictions[i] = completion.text
        return predictions
