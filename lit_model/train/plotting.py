"""The loss-curve figure written at the end of a run (matplotlib, imported only here)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_loss_curve(
    train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: Path, title: str = ""
) -> Path:
    """Training and validation loss against the optimizer step, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; never opens a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1.0, alpha=0.8)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
