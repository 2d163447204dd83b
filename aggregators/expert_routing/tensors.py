"""Names of the mixture's tensors: ``experts.{e}.*``, ``gate.*`` and the shared head."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from pollinate.spec import Tensors

GATE_PREFIX = "gate."
# an expert's head correction -> the shared head tensor it corrects
HEAD_DELTAS = {"delta_weight": "weight", "delta_bias": "bias"}
_EXPERT = re.compile(r"^experts\.(\d+)\.")


def expert_prefix(expert: int) -> str:
    return f"experts.{expert}."


def expert_of(name: str) -> int | None:
    """``experts.3.<...>`` -> 3; ``None`` for gate and head tensors."""
    match = _EXPERT.match(name)
    return int(match.group(1)) if match else None


def expert_tensors(state: Mapping[str, torch.Tensor], experts: Sequence[int]) -> Tensors:
    wanted = set(experts)
    return {n: t for n, t in state.items() if expert_of(n) in wanted}


def single_expert_state(state: Mapping[str, torch.Tensor], expert: int, heads: Sequence[str]) -> Tensors:
    """Expert ``expert`` as a plain LoRA model's adapter: its factors, and the shared head
    plus its head correction (top-1 routing to the expert computes exactly that model)."""
    prefix = expert_prefix(expert)
    single = {n.removeprefix(prefix): t for n, t in expert_tensors(state, [expert]).items()}
    merged = {name: state[name].clone() for name in heads}
    for name in list(single):
        module, _, kind = name.rpartition(".")
        if kind in HEAD_DELTAS:
            merged[f"{module}.{HEAD_DELTAS[kind]}"] += single.pop(name)
    return {**single, **merged}


def router_tensors(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Gate and head: what a client needs before it knows which experts it wants."""
    return {n: t for n, t in state.items() if expert_of(n) is None}
