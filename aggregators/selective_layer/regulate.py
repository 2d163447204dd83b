"""Server-side regulated selection (Sun et al., 2024), solved by :func:`regulate`.

It maximises the selected gradient importance minus ``lambda`` times the disagreement
between the clients' selections, within each client's budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

EXACT_LIMIT = 2_000_000  # DP steps before regulate() falls back to local search


def disagreement(counts: Sequence[int], clients: int) -> float:
    """``sum_l sum_i (m_il - mean_i m_il)^2 = sum_l n_l (N - n_l) / N`` for 0/1 selections."""
    return sum(n * (clients - n) / clients for n in counts) if clients else 0.0


def regulate(importance: Mapping[int, Mapping[int, float]], budgets: Mapping[int, int],
             lam: float, exact_limit: int = EXACT_LIMIT) -> dict[int, list[int]]:
    """Each client's blocks maximising ``sum of selected shares - lam * disagreement``.

    ``importance[node][block]`` are the node's reported squared gradient norms; each
    node's scores are normalised to shares summing to 1 so that one ``lam`` fits every
    client, round and loss scale. Every node fills its budget exactly.

    The penalty ``sum_l n_l (N - n_l) / N`` depends on the selections only through the
    per-layer counts ``n_l``, so a dynamic program over clients whose state is the count
    vector solves the integer program exactly (:func:`_exact`); its work is the number
    of reachable count vectors times each client's ``C(L, budget)`` choices, small for
    the federations this runs (10 clients, 6 layers: a few hundred thousand steps).
    Above ``exact_limit`` steps it falls back to steepest-ascent local search over
    single swaps from two starts (each node's own top blocks and the consensus top
    blocks): swap-optimal, not always optimal (greedy *addition* would be worse still:
    the penalty is convex in the counts, so for large ``lam`` adding any first block
    looks bad and greedy stops with nothing selected).
    """
    nodes = sorted(importance)
    if not nodes:
        return {}
    blocks = sorted(next(iter(importance.values())))
    shares = {node: _shares([importance[node][b] for b in blocks]) for node in nodes}
    need = {node: min(budgets[node], len(blocks)) for node in nodes}
    best = _exact(shares, need, lam, len(blocks), exact_limit)
    if best is None:
        total = [sum(shares[node][j] for node in nodes) for j in range(len(blocks))]
        starts = ({node: _top(shares[node], need[node]) for node in nodes},
                  {node: _top(total, need[node]) for node in nodes})
        best = max((_local_search(start, shares, lam, len(blocks)) for start in starts),
                   key=lambda sel: _objective(sel, shares, lam, len(blocks)))
    return {node: sorted(blocks[j] for j in best[node]) for node in nodes}


def _exact(shares: Mapping[int, list[float]], need: Mapping[int, int], lam: float,
           num_blocks: int, limit: int) -> dict[int, set[int]] | None:
    """Optimal selections by dynamic programming over count vectors; ``None`` past ``limit``."""
    nodes = sorted(shares)
    states: dict[tuple[int, ...], float] = {(0,) * num_blocks: 0.0}
    trail: list[dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]]] = []
    work = 0
    for node in nodes:
        choices = list(itertools.combinations(range(num_blocks), need[node]))
        work += len(states) * len(choices)
        if work > limit:
            return None
        values = [sum(shares[node][j] for j in choice) for choice in choices]
        following: dict[tuple[int, ...], float] = {}
        back: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for counts, value in states.items():
            for choice, gain in zip(choices, values, strict=True):
                key = list(counts)
                for j in choice:
                    key[j] += 1
                reached = tuple(key)
                if reached not in following or value + gain > following[reached]:
                    following[reached] = value + gain
                    back[reached] = (counts, choice)
        states = following
        trail.append(back)
    key = max(states, key=lambda c: states[c] - lam * disagreement(c, len(nodes)))
    selection: dict[int, set[int]] = {}
    for node, back in zip(reversed(nodes), reversed(trail), strict=True):
        key, choice = back[key]
        selection[node] = set(choice)
    return selection


def objective(selection: Mapping[int, Sequence[int]], importance: Mapping[int, Mapping[int, float]],
              lam: float) -> float:
    """The value :func:`regulate` maximises, for any ``node -> blocks`` selection."""
    blocks = sorted(next(iter(importance.values())))
    index = {b: j for j, b in enumerate(blocks)}
    shares = {node: _shares([importance[node][b] for b in blocks]) for node in importance}
    return _objective({node: {index[b] for b in selection[node]} for node in importance}, shares, lam,
                      len(blocks))


def _shares(scores: Sequence[float]) -> list[float]:
    clean = [s if math.isfinite(s) and s > 0 else 0.0 for s in scores]
    total = sum(clean)
    return [s / total for s in clean] if total > 0 else [1.0 / len(clean)] * len(clean)


def _top(scores: Sequence[float], k: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda j: (-scores[j], -j))[:k])


def _objective(selection: Mapping[int, set[int]], shares: Mapping[int, list[float]], lam: float,
               num_blocks: int) -> float:
    counts = [sum(j in chosen for chosen in selection.values()) for j in range(num_blocks)]
    gain = sum(shares[node][j] for node, chosen in selection.items() for j in chosen)
    return gain - lam * disagreement(counts, len(selection))


def _local_search(start: Mapping[int, set[int]], shares: Mapping[int, list[float]], lam: float,
                  num_blocks: int) -> dict[int, set[int]]:
    selection = {node: set(chosen) for node, chosen in start.items()}
    clients = len(selection)
    counts = [sum(j in chosen for chosen in selection.values()) for j in range(num_blocks)]
    while True:
        best_gain, best_move = 1e-12, None
        for node, chosen in selection.items():
            for out in chosen:
                for into in range(num_blocks):
                    if into in chosen:
                        continue
                    # disagreement change of counts[out] - 1 and counts[into] + 1
                    more = (2 * counts[out] - 2 * counts[into] - 2) / clients
                    gain = shares[node][into] - shares[node][out] - lam * more
                    if gain > best_gain:
                        best_gain, best_move = gain, (node, out, into)
        if best_move is None:
            return selection
        node, out, into = best_move
        selection[node].remove(out)
        selection[node].add(into)
        counts[out] -= 1
        counts[into] += 1
