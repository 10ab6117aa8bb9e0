"""Loss plot of a run (PNG), drawn from the Trainer's log history."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: str | Path, title: str = "training loss") -> bool:
    """Write a loss-vs-step plot; returns False (and writes nothing) when there is no loss logged."""
    points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    steps, losses = zip(*points, strict=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, marker="." if len(points) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
