"""One row of a projector comparison, and the chance level of the shapes task it is read against."""

from __future__ import annotations

from dataclasses import dataclass, field

SHAPES_CHANCE = (1 / 4 + 1 / 6 + 1 / 24) / 3  # shape, colour, describe (names both): mean chance over the three


@dataclass
class ProjectorResult:
    """One row of the comparison."""

    projector: str
    parameters: int
    visual_tokens: int
    step_time_ms: float
    """Mean wall time per sft optimizer step (data loading included)."""
    memory_mib: float
    """Training memory of one sft micro-batch: weights + gradients + AdamW states + activations saved for backward."""
    final_loss: float
    """The last logged sft training loss."""
    accuracy: float
    """The held-out headline metric (`metric`) over all questions: accuracy for the custom JSONL."""
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    """The same metric per kind (custom) or category (a standard benchmark)."""
    train_seconds: float = 0.0
    metric: str = "accuracy"
    """The benchmark's headline metric that `accuracy` holds (circular_accuracy for MMBench, f1 for POPE, ...)."""
    strategy: str = ""
    """The image strategy's name in the comparison's `strategies` (empty: the recipe's own)."""

    @property
    def label(self) -> str:
        """The projector, with its strategy when there is one."""
        return f"{self.projector} ({self.strategy})" if self.strategy else self.projector
