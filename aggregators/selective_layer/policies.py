"""Client-side selection policies, looked up by name in :data:`POLICIES`."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SelectionInput:
    """What a policy may look at: the blocks, the budget, scores, a seeded RNG, the server's say."""

    blocks: tuple[int, ...]
    budget: int
    importance: Mapping[int, float] | None = None
    seed: int = 0
    assigned: tuple[int, ...] | None = None  # regulated: the server's choice for this client


@dataclass(frozen=True)
class Policy:
    choose: Callable[[SelectionInput], tuple[list[int], str]]  # -> (blocks, policy actually used)
    needs_importance: bool = False


def by_importance(inp: SelectionInput) -> list[int]:
    """The ``budget`` blocks with the largest scores (ties: the block nearer the output)."""
    assert inp.importance is not None
    ranked = sorted(inp.blocks, key=lambda b: (-inp.importance[b], -b))
    return sorted(ranked[:inp.budget])


def _gradient(inp: SelectionInput) -> tuple[list[int], str]:
    return by_importance(inp), "gradient"


def _regulated(inp: SelectionInput) -> tuple[list[int], str]:
    """The server's assignment; without one (round 1, a new node, a changed budget): gradient."""
    assigned = inp.assigned
    if assigned and len(assigned) <= inp.budget and set(assigned) <= set(inp.blocks):
        return sorted(assigned), "regulated"
    return by_importance(inp), "gradient"


POLICIES: dict[str, Policy] = {
    "all": Policy(lambda inp: (list(inp.blocks), "all")),
    "top": Policy(lambda inp: (list(inp.blocks[len(inp.blocks) - inp.budget:]), "top")),
    "bottom": Policy(lambda inp: (list(inp.blocks[:inp.budget]), "bottom")),
    "random": Policy(lambda inp: (sorted(random.Random(inp.seed).sample(inp.blocks, inp.budget)),
                                  "random")),
    "gradient": Policy(_gradient, needs_importance=True),
    "regulated": Policy(_regulated, needs_importance=True),
}
"""Selection policies by name. ``top``/``bottom``: the blocks nearest the output/input."""
