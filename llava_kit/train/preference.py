"""Preference tuning (stages dpo, text-dpo): the loss, the reference model and the Trainer that computes them.

    loss, metrics = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, n_chosen,
                                    n_rejected, cfg.train.preference)

The engine's own loss on the HF Trainer (not TRL's DPOTrainer: docs/preference.md says why). A batch of B pairs is
2B rows, the chosen conversations then the rejected ones (llava_kit/data/preference.py); the images of the B pairs
are encoded once and their features used for both rows of a pair, and the tower's output is reused by the
reference pass, so the tower runs once per pair in all. Log-probabilities are summed over the labelled (answer)
tokens only. The reference is the policy with its LoRA adapter disabled (no second copy of the LLM), with a frozen
copy of the projector when the projector trains; under full tuning, a frozen copy of the LLM. SimPO and ORPO need
no reference and skip its pass.

Metrics (logged with the loss: metrics.jsonl, TensorBoard): rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected; `eval_` versions at each held-out evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

from llava_kit.config import PreferenceConfig
from llava_kit.data.encode import IGNORE_INDEX
from llava_kit.model.llava import LlavaModel, answer_logps, causal_lm_of
from llava_kit.train.trainer import LlavaTrainer

logger = logging.getLogger(__name__)

REFERENCE_FREE = ("simpo", "orpo")
"""Losses that compare the policy with itself: no reference pass."""


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                    ref_rejected: torch.Tensor | None, n_chosen: torch.Tensor, n_rejected: torch.Tensor,
                    settings: PreferenceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean loss over B pairs and its metrics, from summed answer log-probs [B] and answer token counts [B].

    sigmoid (DPO):  h = (chosen - ref_chosen) - (rejected - ref_rejected)
                    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (eps: label_smoothing)
    ipo:            the same h on mean per-token log-probs;  loss = (h - 1 / (2 beta))^2
    simpo:          h = mean log-prob(chosen) - mean log-prob(rejected)
                    loss = -(1 - eps) log sigmoid(beta h - gamma) - eps log sigmoid(-(beta h - gamma))
    orpo:           a = mean log-probs;  log odds(p) = a - log(1 - exp(a))
                    loss = -a_chosen - beta log sigmoid(log odds(chosen) - log odds(rejected))
    sft_weight w > 0 adds w x the chosen answer's mean NLL (LLaMA-Factory's pref_ftx, RPO).
    Rewards: beta x (log-prob - reference log-prob) for sigmoid and ipo (on the log-probs the loss uses), beta x
    mean log-prob for simpo and orpo.
    """
    beta, eps, kind = settings.beta, settings.label_smoothing, settings.loss_type
    chosen_nll = -chosen / n_chosen.clamp(min=1)  # [B] mean per answer token (sft_weight)
    if kind in ("ipo", "simpo", "orpo"):  # mean per-token log-probs: long answers are not favoured
        chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        if ref_chosen is not None:
            ref_chosen, ref_rejected = ref_chosen / n_chosen.clamp(min=1), ref_rejected / n_rejected.clamp(min=1)
    if kind in ("sigmoid", "ipo"):
        reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        if kind == "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        else:
            losses = (h - 1 / (2 * beta)) ** 2
    elif kind == "simpo":
        reward_chosen, reward_rejected = beta * chosen, beta * rejected
        z = beta * (chosen - rejected) - settings.simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif kind == "orpo":
        reward_chosen, reward_rejected = beta * chosen, beta * rejected
        # log(1 - p) of a mean log-prob a: log(-expm1(a)), kept finite when a answer is (nearly) certain
        c, r = chosen.clamp(max=-1e-6), rejected.clamp(max=-1e-6)
        log_odds = (c - r) - (torch.log(-torch.expm1(c)) - torch.log(-torch.expm1(r)))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown loss_type {kind!r}")  # config.PREFERENCE_LOSSES is checked before a run
    if settings.sft_weight:
        losses = losses + settings.sft_weight * chosen_nll
    metrics = {"rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
               "rewards/margins": (reward_chosen - reward_rejected).mean(),
               "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
               "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean()}
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def text_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer token counts per row of a causal LM (peft-wrapped or not)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logps, n_tokens = answer_logps(logits[keep], targets, keep)
    return logps, n_tokens


class Reference:
    """The reference model of a policy, without a second copy where LoRA makes one unnecessary.

    LoRA: the policy with its adapter disabled (peft `disable_adapter()`); a trained projector is replaced by a
    frozen copy of its starting weights for the reference pass. Full tuning: a frozen copy of the LLM (and of the
    projector when it trains), made before the first step."""

    def __init__(self, model):
        self.multimodal = isinstance(model, LlavaModel)
        llm = model.language_model if self.multimodal else model
        self.uses_adapter = hasattr(llm, "disable_adapter")
        self.llm = None if self.uses_adapter else _frozen_copy(causal_lm_of(llm))
        self.projector = None
        if self.multimodal and any(p.requires_grad for p in model.multi_modal_projector.parameters()):
            self.projector = _frozen_copy(model.multi_modal_projector)
        logger.info("reference model: %s%s", "the policy with its LoRA adapter disabled" if self.uses_adapter
                    else "a frozen copy of the LLM (full tuning)",
                    ", with a frozen copy of the starting projector" if self.projector is not None else "")

    @contextlib.contextmanager
    def active(self, model):
        """Within: `model` (the unwrapped policy) computes as the reference. Text models under full tuning are
        not changed (call `self.llm` instead)."""
        with contextlib.ExitStack() as stack:
            if self.multimodal:
                swaps = {"multi_modal_projector": self.projector, "language_model": self.llm}
                for name, module in swaps.items():
                    if module is not None:
                        stack.enter_context(_swapped(model, name, module.to(model.device)))
            if self.uses_adapter:
                llm = model.language_model if self.multimodal else model
                stack.enter_context(llm.disable_adapter())
            yield


def _frozen_copy(module):
    module = copy.deepcopy(module).eval()
    module.requires_grad_(False)
    return module


@contextlib.contextmanager
def _swapped(model, name: str, module):
    original = getattr(model, name)
    setattr(model, name, module)
    try:
        yield
    finally:
        setattr(model, name, original)


class PreferenceTrainer(LlavaTrainer):
    """LlavaTrainer whose loss is the preference loss of `settings` over batches of pairs; the reward metrics are
    averaged over the steps between two log lines and logged with the loss."""

    def __init__(self, *args, settings: PreferenceConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.reference = None if settings.loss_type in REFERENCE_FREE else Reference(self.model)
        self._stored: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list),
                                                                  "eval": defaultdict(list)}

    def pair_logps(self, model, inputs: dict, reference: bool = False, features=None) -> dict:
        """{"logps", "n_tokens", "vision_features"} of the 2B rows, by the policy or (no grad) the reference."""
        unwrapped = self.accelerator.unwrap_model(model)
        rows = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        if isinstance(unwrapped, LlavaModel):
            images = {"vision_features": features} if features is not None else \
                {k: inputs[k] for k in ("pixel_values", "vision_features") if k in inputs}
            if not reference:
                return model(**rows, **images, paired_rows=True, return_logps=True)
            with torch.no_grad(), self.reference.active(unwrapped):
                return model(**rows, **images, paired_rows=True, return_logps=True)
        if not reference:
            logps, n_tokens = text_logps(model, **rows)
        elif self.reference.llm is not None:
            with torch.no_grad():
                logps, n_tokens = text_logps(self.reference.llm.to(unwrapped.device), **rows)
        else:
            with torch.no_grad(), self.reference.active(unwrapped):
                logps, n_tokens = text_logps(model, **rows)
        return {"logps": logps, "n_tokens": n_tokens, "vision_features": None}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy = self.pair_logps(model, inputs)
        pairs = policy["logps"].shape[0] // 2
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            # the tower's output of the policy pass: the reference encodes no image again
            ref = self.pair_logps(model, inputs, reference=True, features=policy["vision_features"])
            ref_chosen, ref_rejected = ref["logps"][:pairs], ref["logps"][pairs:]
        n = policy["n_tokens"]
        loss, metrics = preference_loss(policy["logps"][:pairs], policy["logps"][pairs:], ref_chosen, ref_rejected,
                                        n[:pairs], n[pairs:], self.settings)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._stored[mode][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the reward metrics averaged since the last log line (over all processes): train metrics to the
        training loss's line, `eval_` ones to the evaluation's."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None and self._stored[mode]:
            prefix = "eval_" if mode == "eval" else ""
            for key, values in self._stored[mode].items():
                mean = self.accelerator.reduce(torch.stack(values).mean().to(self.args.device), "mean")
                logs[prefix + key] = round(float(mean), 6)
            self._stored[mode].clear()
        super().log(logs, start_time)
