"""Which transformer layers a client trains this round: layer groups, budgets, scores, policies.

A *layer* is one transformer block: every LoRA module whose canonical name contains
``encoder.layer.{i}.`` (BERT family) or ``layers.{i}.`` (Llama family) belongs to block
``i``. The classification head is always trained; LoRA on embeddings is refused (the
method has no rule for it), and so is LoRA on any other module outside a block.

A client's *budget* is how many blocks it may train: node config ``max-layers`` in a
deployment, else its entry of the aggregator option ``budgets`` (``2:2:6``, indexed by
``partition-id`` and cycled; ``:`` separates entries because ``aggregator-options``
itself is comma-separated), else every block.

Policies are looked up by name in :data:`POLICIES`. ``regulated`` is the server-side
choice of Sun et al. (2024), solved by :func:`regulate`: it maximises the selected
gradient importance minus ``lambda`` times the disagreement between the clients'
selections, within each client's budget.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pollinate.config import ConfigError
from pollinate.modeling import AdapterModel

_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")
OPTIONS = ("policy", "budgets", "lambda", "seed")
BUDGET_SEPARATORS = re.compile(r"[:;/\s]+")
EXACT_LIMIT = 2_000_000  # DP steps before regulate() falls back to local search


def block_of(name: str) -> int | None:
    """Index of the transformer block a canonical tensor name belongs to, or ``None``."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def transformer_layers(model: AdapterModel) -> dict[int, list[str]]:
    """``block -> adapter tensor names`` of every LoRA module; refuses LoRA outside blocks."""
    heads = set(model.head_names())
    layers: dict[int, list[str]] = {}
    for name in model.adapter_names:
        if name in heads:
            continue
        block = block_of(name)
        if block is None:
            kind = "embeddings" if "embed" in name else "a module outside the transformer blocks"
            raise ConfigError(
                f"selective-layer: adapter tensor {name!r} is LoRA on {kind}; layers are transformer "
                "blocks (encoder.layer.{i} / layers.{i}) and embeddings are never trained: "
                "restrict target-modules to modules inside the blocks")
        layers.setdefault(block, []).append(name)
    if not layers:
        raise ConfigError("selective-layer: the model has no LoRA modules inside transformer blocks")
    return dict(sorted(layers.items()))


# -- options and budgets ----------------------------------------------------------------

@dataclass(frozen=True)
class SelectionOptions:
    """The method's ``aggregator-options``, validated (both halves parse the same mapping)."""

    policy: str = "regulated"
    budgets: tuple[int | None, ...] = ()  # None = every layer
    lam: float = 0.1
    seed: int = 0

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> SelectionOptions:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"aggregator-options: unknown option(s) {unknown} for selective-layer "
                              f"(known: {', '.join(OPTIONS)})")
        policy = str(options.get("policy", cls.policy))
        if policy not in POLICIES:
            raise ConfigError(f"aggregator-options policy: unknown selection policy {policy!r}; "
                              f"known: {', '.join(sorted(POLICIES))}")
        try:
            lam = float(options.get("lambda", cls.lam))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"aggregator-options lambda must be a number, "
                              f"got {options['lambda']!r}") from err
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"aggregator-options lambda must be >= 0, got {lam}")
        return cls(policy, parse_budgets(options.get("budgets", "")), lam,
                   int(options.get("seed", 0)))


def parse_budgets(value: Any) -> tuple[int | None, ...]:
    """``"2:2:6"``, ``6``, ``"all"`` or a list -> per-partition budgets (``None`` = all layers)."""
    if isinstance(value, str):
        items: list[Any] = [v for v in BUDGET_SEPARATORS.split(value.strip()) if v]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        items = [value]
    return tuple(_budget(item, "aggregator-options budgets") for item in items)


def _budget(item: Any, option: str) -> int | None:
    if isinstance(item, str) and item.strip().lower() == "all":
        return None
    try:
        number = float(item)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{option}: expected a number of layers or 'all', got {item!r} "
                          "(separate per-client budgets with ':', e.g. budgets=2:6)") from err
    if isinstance(item, bool) or not number.is_integer():
        raise ConfigError(f"{option}: expected a whole number of layers, got {item!r}")
    if number < 1:
        raise ConfigError(f"{option}: a client must train at least 1 layer, got {item!r}")
    return int(number)


def client_budget(node: Mapping[str, Any], options: SelectionOptions, num_layers: int) -> int:
    """How many layers this node trains: node ``max-layers``, else ``budgets[partition-id]``."""
    if "max-layers" in node:
        option = "node config max-layers"
        budget = _budget(node["max-layers"], option)
    elif options.budgets:
        option = "aggregator-options budgets"
        if len(options.budgets) == 1:
            budget = options.budgets[0]
        elif "partition-id" in node:
            budget = options.budgets[int(node["partition-id"]) % len(options.budgets)]
        else:
            raise ConfigError(f"{option} has {len(options.budgets)} entries but this node has no "
                              "partition-id; set max-layers in its node config")
    else:
        return num_layers
    return check_budget(budget, num_layers, option, options.policy)


def check_budget(budget: int | None, num_layers: int, option: str, policy: str) -> int:
    """``budget`` resolved against the model (``None`` -> all); raises if it cannot be met."""
    if budget is None:
        return num_layers
    if budget > num_layers:
        raise ConfigError(f"{option}: max-layers={budget} but the model has only {num_layers} "
                          "transformer layers with LoRA")
    if policy == "all" and budget < num_layers:
        raise ConfigError(f"{option}: policy 'all' trains all {num_layers} layers, "
                          f"but the budget is {budget}; choose another policy")
    return budget


# -- importance -------------------------------------------------------------------------

def layer_importance(model: AdapterModel, layers: Mapping[int, Sequence[str]],
                     probe: Sequence[Mapping[str, torch.Tensor]]) -> dict[int, float]:
    """Squared norm of each layer's LoRA gradient, averaged over the ``probe`` batches.

    Forward and backward in eval mode (no dropout, so the score is a function of the
    model and the batches), the gradients of ``lora_A``/``lora_B`` read per block and
    then cleared so that training starts from clean ``.grad`` fields.
    """
    names = [n for block in layers.values() for n in block]
    model.set_trainable(set(names))
    params = [model.parameter(n) for n in names]
    net = model.model
    was_training = net.training
    net.eval()
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            for batch in probe:
                (net(**batch).loss / len(probe)).backward()
        scores = {block: sum(float(model.parameter(n).grad.detach().float().pow(2).sum())
                             for n in block_names if model.parameter(n).grad is not None)
                  for block, block_names in layers.items()}
    finally:
        for p in params:
            p.grad = None
        net.train(was_training)
    return scores


# -- client-side policies ---------------------------------------------------------------

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


# -- server-side regulation -------------------------------------------------------------

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
