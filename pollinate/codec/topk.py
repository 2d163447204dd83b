"""Top-k sparsification: which elements of each tensor a sparse delta keeps.

``global`` scope ranks |value| over all tensors together (one threshold), so the budget
goes where the update is largest and a tensor may keep nothing; ``tensor`` scope keeps
k = max(1, round(density * numel)) elements of every non-empty tensor. Exactly k elements
win (ties broken arbitrarily by ``argpartition``); exact zeros are then dropped, since
sending them costs bytes and decodes to the same thing.
"""

from __future__ import annotations

import numpy as np


def _top_mask(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest non-zero ``magnitudes``."""
    n = magnitudes.size
    if k >= n:
        return magnitudes > 0
    mask = np.zeros(n, dtype=bool)
    mask[np.argpartition(magnitudes, n - k)[n - k:]] = True
    return mask & (magnitudes > 0)


def _k(density: float, numel: int) -> int:
    return max(1, round(density * numel)) if numel else 0


def select(flat: dict[str, np.ndarray], density: float, scope: str) -> dict[str, np.ndarray]:
    """Sorted int64 flat indices kept per tensor of ``flat`` (1-D float32 arrays)."""
    if scope == "tensor":
        return {name: np.flatnonzero(_top_mask(np.abs(x), _k(density, x.size)))
                for name, x in flat.items()}
    magnitudes = np.abs(np.concatenate(list(flat.values()))) if flat else np.empty(0)
    mask = _top_mask(magnitudes, _k(density, magnitudes.size))
    bounds = np.cumsum([0, *(x.size for x in flat.values())])
    return {name: np.flatnonzero(mask[start:stop])
            for name, start, stop in zip(flat, bounds[:-1], bounds[1:], strict=True)}
