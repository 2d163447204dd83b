"""Which experts a client trains: its own best-covering set, or the server's balanced deal."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch

EXACT_CHOICES = 4096  # expert subsets client_choice scores exhaustively (C(16, 4) = 1820)


def client_choice(probs: torch.Tensor, count: int) -> tuple[int, ...]:
    """The ``count`` experts that best cover a client's examples (``probs``: ``[N, E]``).

    Coverage of a set S is ``sum_x max_{e in S} p_e(x)``: how much gate probability each
    example keeps on its favourite expert in S (facility location). The top mean
    probabilities are not the same thing: an expert that every example likes a little
    outranks one that half of them like a lot, and that half is then left without an
    expert of its own (AG News benchmark: a held-out client with two topics chose a pair
    that knew one of them, 0.52 accuracy, where its best-covering pair gave 0.86).
    Exact over all subsets up to :data:`EXACT_CHOICES` of them, else greedy followed by
    single swaps while one improves the coverage; ties go to the lower expert ids.
    """
    experts = probs.shape[1]
    if not 1 <= count <= experts:
        raise ValueError(f"experts to choose must be in 1..{experts}, got {count}")
    probs = probs.double()  # sums that do not depend on the order of the subsets tried
    if math.comb(experts, count) <= EXACT_CHOICES:
        subsets = torch.combinations(torch.arange(experts), count)
        return tuple(subsets[int(_coverage(probs, subsets).argmax())].tolist())
    chosen = torch.empty(0, dtype=torch.long)
    for _ in range(count):
        others = _others(chosen, experts)
        candidates = torch.cat([chosen.expand(len(others), -1), others[:, None]], 1)
        chosen = candidates[int(_coverage(probs, candidates).argmax())]
    cover = _coverage(probs, chosen[None])[0]
    while True:
        others = _others(chosen, experts)
        trials = chosen.repeat(count * len(others), 1)  # swap slot i for each other expert in turn
        trials[torch.arange(len(trials)), torch.arange(count).repeat_interleave(len(others))] = \
            others.repeat(count)
        covers = _coverage(probs, trials)
        best = int(covers.argmax())
        if covers[best] <= cover:
            return tuple(sorted(chosen.tolist()))
        chosen, cover = trials[best], covers[best]


def _others(chosen: torch.Tensor, experts: int) -> torch.Tensor:
    keep = torch.ones(experts, dtype=torch.bool)
    keep[chosen] = False
    return keep.nonzero().squeeze(1)


def _coverage(probs: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
    """Coverage of each row of ``subsets`` (``[S, k]``), 256 subsets at a time so that the
    ``[N, S, k]`` gather stays small for a client with many examples."""
    return torch.cat([probs[:, chunk].amax(-1).sum(0) for chunk in subsets.split(256)])


def assign_experts(scores: Mapping[int, Sequence[float]], unknown: Sequence[int], experts: int,
                   per_client: int, seed: int) -> dict[int, tuple[int, ...]]:
    """``per_client`` distinct experts for every node of ``scores`` and ``unknown``.

    Nodes with scores are served greedily, best (score, node, expert) first, while the
    expert has capacity ``ceil(nodes * per_client / experts)``; then the unknown nodes (in
    seeded random order) and any node still short take the least-used experts, seeded
    ties, over capacity only if nothing else is left.
    """
    nodes = [*scores, *unknown]
    capacity = math.ceil(len(nodes) * per_client / experts)
    load = [0] * experts
    hands: dict[int, list[int]] = {n: [] for n in nodes}
    for _, node, expert in sorted((-float(s), n, e) for n, row in scores.items() for e, s in enumerate(row)):
        if len(hands[node]) < per_client and load[expert] < capacity:
            hands[node].append(expert)
            load[expert] += 1
    rng = random.Random(seed)
    for node in rng.sample(list(unknown), len(unknown)) + [n for n in scores if len(hands[n]) < per_client]:
        while len(hands[node]) < per_client:
            expert = min((e for e in range(experts) if e not in hands[node]),
                         key=lambda e: (load[e] >= capacity, load[e], rng.random()))
            hands[node].append(expert)
            load[expert] += 1
    return {n: tuple(sorted(h)) for n, h in hands.items()}
