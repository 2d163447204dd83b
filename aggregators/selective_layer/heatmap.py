"""The rounds x layers heatmap of selection counts (``layer_selection.png``)."""

from __future__ import annotations

from pathlib import Path


def selection_heatmap(grid: list[list[float]], rounds: list[int], blocks: list[int], path: Path,
                      title: str = "clients training each layer") -> Path:
    """Rounds x layers heatmap of selection counts, each cell annotated with its count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(blocks), 1.2 + 0.35 * len(rounds)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_yticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_xlabel("transformer layer")
    ax.set_ylabel("round")
    ax.set_title(title)
    bright = 0.6 * max((v for row in grid for v in row), default=0.0)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:g}", ha="center", va="center", fontsize=8,
                    color="black" if value > bright else "white")
    fig.colorbar(image, ax=ax, label="clients")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
