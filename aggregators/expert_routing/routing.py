"""Which experts each example goes to: the per-forward routing, top-k and its auxiliary loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RoutingPolicy:
    """Which experts examples may go to (``None``: all) and how many each (``None``: top-k)."""

    allowed: tuple[int, ...] | None = None
    top_k: int | None = None


@dataclass
class Routing:
    """Per-forward routing shared by every expert layer: ``index``/``weight`` are ``[B, k]``."""

    index: torch.Tensor | None = None
    weight: torch.Tensor | None = None


def allowed_mask(num_experts: int, allowed: Sequence[int] | None,
                 device: torch.device | str) -> torch.Tensor | None:
    if allowed is None:
        return None
    mask = torch.zeros(num_experts, dtype=torch.bool, device=device)
    mask[list(allowed)] = True
    return mask


def route(gate_logits: torch.Tensor, k: int,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` experts per example among ``mask`` and their renormalised softmax weights."""
    logits = gate_logits if mask is None else gate_logits.masked_fill(~mask, float("-inf"))
    probs = logits.float().softmax(-1)
    weight, index = probs.topk(min(k, int(mask.sum()) if mask is not None else k), dim=-1)
    return index, weight / weight.sum(-1, keepdim=True)


def routed_counts(probs: torch.Tensor, allowed: Sequence[int], k: int) -> dict[int, int]:
    """Examples whose top-``k`` among ``allowed`` includes each allowed expert."""
    mask = allowed_mask(probs.shape[1], allowed, probs.device)
    index = probs.masked_fill(~mask, -1.0).topk(min(k, len(allowed)), dim=-1).indices
    return {e: int((index == e).any(-1).sum()) for e in allowed}


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load balance ``E sum_e f_e P_e`` (1 when routing is uniform)."""
    experts = probs.shape[-1]
    fraction = F.one_hot(probs.argmax(-1), experts).float().mean(0)
    return experts * (fraction * probs.mean(0)).sum()
