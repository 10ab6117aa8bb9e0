"""Loss plot of a run (PNG), drawn from the Trainer's log history: the training loss, and the held-out loss."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: str | Path, title: str = "training loss") -> bool:
    """Write a loss-vs-step plot (held-out `eval_loss` as a second line when there is one); returns False (and
    writes nothing) when there is no loss logged."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    held_out = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    steps, losses = zip(*points, strict=True)
    ax.plot(steps, losses, marker="." if len(points) < 50 else None, label="training loss")
    if held_out:
        steps, losses = zip(*held_out, strict=True)
        ax.plot(steps, losses, marker="o", label="held-out loss (data.eval_path)")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
