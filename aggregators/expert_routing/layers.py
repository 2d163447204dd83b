"""The mixture's modules: expert LoRA layers, per-expert head corrections and the gate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pollinate.aggregators.expert_routing.routing import Routing

GATE_OUT_GAIN = 3.0  # initial gate logits of O(1) so routing starts diverse but not uniform
GATE_LOGIT_SCALE = 8.0  # logits = scale * out(h): Adam's ~lr steps on out move logits scale x faster


class ExpertLinear(nn.Module):
    """A frozen linear layer plus E LoRA experts, applied per example as ``routing`` says."""

    def __init__(self, base_layer: nn.Linear, routing: Routing, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()

    def reset(self, experts: int, rank: int) -> None:
        """Fresh experts as peft initialises LoRA: A Kaiming-uniform, B zero (the base model)."""
        device = self.base_layer.weight.device
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()
        for _ in range(experts):
            a = torch.empty(rank, self.base_layer.in_features, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(self.base_layer.out_features, rank, device=device)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.routing.index is None:
            return out
        for slot in range(self.routing.index.shape[1]):
            out = out + self._slot(x, self.routing.index[:, slot], self.routing.weight[:, slot])
        return out

    def _slot(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``w_b s B_{e_b} A_{e_b} x_b`` for every example b, computed expert by expert."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        experts = index.unique().tolist()
        if len(experts) == 1:
            return self._lora(experts[0], x) * weight.view(shape).to(x.dtype)
        delta = None
        for expert in experts:
            rows = (index == expert).nonzero().squeeze(1)
            part = self._lora(expert, x.index_select(0, rows)) * weight[rows].view(shape).to(x.dtype)
            if delta is None:
                delta = part.new_zeros((x.shape[0], *part.shape[1:]))
            delta = delta.index_add(0, rows, part)
        return delta

    def _lora(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A[expert]), self.lora_B[expert]) * self.scaling


class ExpertHead(nn.Linear):
    """The shared classification head (its ``weight``/``bias`` keep their names) plus a
    zero-initialised correction per expert, mixed per example by ``routing``."""

    def __init__(self, head: nn.Linear, routing: Routing):
        nn.Module.__init__(self)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.weight, self.bias = head.weight, head.bias
        self.routing = routing
        self.delta_weight = nn.ParameterList()
        self.delta_bias = nn.ParameterList()

    def reset(self, experts: int) -> None:
        shape, device = (self.out_features, self.in_features), self.weight.device
        self.delta_weight = nn.ParameterList(nn.Parameter(torch.zeros(shape, device=device))
                                             for _ in range(experts))
        self.delta_bias = nn.ParameterList(nn.Parameter(torch.zeros(shape[0], device=device))
                                           for _ in range(experts if self.bias is not None else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.routing.index is None or not len(self.delta_weight):
            return out
        weights = torch.stack(list(self.delta_weight))
        biases = torch.stack(list(self.delta_bias)) if len(self.delta_bias) else None
        for slot in range(self.routing.index.shape[1]):
            index = self.routing.index[:, slot]
            mix = self.routing.weight[:, slot].to(x.dtype)
            correction = torch.einsum("boi,b...i->b...o", weights[index].to(x.dtype), x)
            if biases is not None:  # a head without bias (Llama's score) gets no bias correction
                correction = correction + biases[index].to(x.dtype).view(
                    index.shape[0], *([1] * (x.dim() - 2)), -1)
            out = out + correction * mix.view(-1, *([1] * (x.dim() - 1)))
        return out


class Gate(nn.Module):
    """``c (W2 tanh(W1 e + b1) + b2)`` on the common expert's normalised embedding ``e``.

    The constant ``c`` (:data:`GATE_LOGIT_SCALE`) lets the few local steps a client takes
    per round move routing decisions: Adam changes each weight by about the learning rate
    whatever the gradient's scale, so without it the gate lags far behind the experts.
    """

    def __init__(self, dim: int, hidden: int, experts: int):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, experts)
        # Gaussian rows: nearly orthogonal directions in high dimension, and unlike orthogonal_
        # (a LAPACK QR whose rounding depends on the thread count) bitwise reproducible, which
        # clients need to rebuild the seeded first version. N(0, 1) entries make the hidden
        # pre-activations O(1) for unit-norm embeddings; output rows have norm ~ gain / c.
        nn.init.normal_(self.hidden.weight)
        nn.init.normal_(self.out.weight, std=GATE_OUT_GAIN / GATE_LOGIT_SCALE / math.sqrt(hidden))
        nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return GATE_LOGIT_SCALE * self.out(torch.tanh(self.hidden(embedding)))
