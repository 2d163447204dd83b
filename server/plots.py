"""PNG plots of a run: quality per round and bytes on the wire per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_rounds(rounds: list[dict[str, Any]], directory: Path) -> list[Path]:
    """``quality.png`` (accuracy and/or loss) and ``bytes.png`` (up and down per round)."""
    xs = [r["round"] for r in rounds]
    quality = directory / "quality.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    if any("accuracy" in r for r in rounds):
        ax.plot(xs, [r.get("accuracy") for r in rounds], "o-", label="accuracy")
        ax.set_ylabel("accuracy")
        loss_ax = ax.twinx()
        loss_ax.set_ylabel("loss")
    else:
        loss_ax = ax
        ax.set_ylabel("loss")
    loss_ax.plot(xs, [r.get("loss") for r in rounds], "s--", color="tab:red", label="loss")
    ax.set_xlabel("round")
    ax.set_title("global model on the held-out split")
    fig.legend(loc="lower center", ncol=2)
    fig.tight_layout()
    fig.savefig(quality, dpi=100)
    plt.close(fig)

    traffic = directory / "bytes.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    later = [r for r in rounds if r["round"] > 0]
    ax.bar([r["round"] - 0.2 for r in later], [r["bytes_up"] for r in later], 0.4, label="up")
    ax.bar([r["round"] + 0.2 for r in later], [r["bytes_down"] for r in later], 0.4, label="down")
    ax.set_xlabel("round")
    ax.set_ylabel("bytes (all clients)")
    ax.set_title("bytes on the wire per round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(traffic, dpi=100)
    plt.close(fig)
    return [quality, traffic]
