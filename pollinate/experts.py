"""A mixture of LoRA experts over one frozen base model, routed by a gate on a frozen embedding.

FedJETs (Dun et al., 2023) trains specialised experts on different client populations and
routes each input with a small gate that reads the embedding of a frozen pretrained
"common expert". Here the experts are E LoRA adapters on the same frozen base model and
the common expert is that base model itself with every adapter switched off:

* **gate input**: the base model's mean-pooled, L2-normalised last hidden state of the
  example (adapters disabled, eval mode, no gradient). It never changes, so it is
  memoised per example (keyed by the example's tokens) and every client embeds its
  local data once.
* **gate**: ``logits = W2 tanh(W1 e + b1) + b2``; softmax over the experts an example
  may use (all, or the ones a client trains), top-k, weights renormalised over the k.
* **mixing**: inside every adapted linear layer, ``y = W x + sum_j w_j s B_{e_j} A_{e_j} x``
  over the example's k experts (MoLoRA-style mixing of the experts' adapter outputs).
  With k = 1 an example sees exactly one expert, i.e. expert e alone is a standard LoRA
  model, which is what :meth:`MixtureModel.export` writes per expert.
* **expert heads** (``expert-heads``, on by default): FedJETs' experts are whole models,
  classifier included, and a label-skewed population needs its expert to shift the class
  scores, not only the features. Each expert owns a zero-initialised correction
  ``(D_e, c_e)`` of the shared classification head, mixed by the same routing weights:
  ``logits = W h + b + sum_j w_j (D_{e_j} h + c_{e_j})``; it travels with the expert
  (``experts.{e}.classifier.delta_weight`` / ``.delta_bias``).
* **efficiency**: one base forward per batch whatever k and E are; in each adapted
  layer the batch is grouped by expert and each expert runs only on its rows
  (``index_select`` / ``index_add``). The LoRA experts are implemented directly rather
  than as peft named adapters: peft activates one adapter per forward (``set_adapter``,
  which also flips ``requires_grad``) and only allows per-example adapters at inference,
  while routing needs per-example experts during training.
* **auxiliary losses** (training only): Switch-style load balance ``E sum_e f_e P_e``
  over the unrestricted gate, and a routing loss ``-log sum_{e in allowed} p_e`` that
  teaches the unrestricted gate to send this data to the experts the client trains
  (for an anchor client pinned to expert e this is cross-entropy toward e). The second
  term is what makes the gate useful to clients that never trained.

:class:`MixtureModel` is an :class:`~pollinate.modeling.AdapterModel`: canonical names
are ``experts.{e}.<peft lora name>`` (e.g. ``experts.2.bert.encoder.layer.0.attention.
self.query.lora_A.weight``), ``gate.*`` and the shared head (``classifier.*``), and
``model.model(**batch)`` returns ``.loss`` and ``.logits`` like a transformers model.
What a client may route to (:class:`RoutingPolicy`) is set per round by the method's
client half and reset by every ``load_global``, so no client's state outlives its round
in the cached model.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pollinate.config import ConfigError
from pollinate.data import Encoded, batches
from pollinate.modeling import (
    HEAD_MODULES,
    AdapterModel,
    ModelSpec,
    _base_model,
    build_model,
    load_tokenizer,
    resolve_targets,
)
from pollinate.spec import Tensors

GATE_PREFIX = "gate."
# an expert's head correction -> the shared head tensor it corrects
HEAD_DELTAS = {"delta_weight": "weight", "delta_bias": "bias"}
STARTS = ("assign", "kmeans")
CHOICES = ("balanced", "gate")
_EXPERT = re.compile(r"^experts\.(\d+)\.")
_LIST_SEPARATORS = re.compile(r"[:;/\s]+")
EXACT_CHOICES = 4096  # expert subsets client_choice scores exhaustively (C(16, 4) = 1820)
MEMO_SIZE = 65536  # common-expert embeddings kept per process (384 floats each for MiniLM)
CENTROID_SHARPNESS = 4.0  # k-means gate: tanh(s * cosine) on the expert's hidden unit
GATE_OUT_GAIN = 3.0  # initial gate logits of O(1) so routing starts diverse but not uniform
GATE_LOGIT_SCALE = 8.0  # logits = scale * out(h): Adam's ~lr steps on out move logits scale x faster


# -- options ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertConfig:
    """The method's options (``aggregator-options``), validated on construction."""

    experts: int = 4
    top_k: int = 2
    client_experts: int = 2
    balance_weight: float = 0.01
    balance_rate: float = 1.0
    route_weight: float = 1.0
    gate_hidden: int = 64
    start: str = "assign"
    choice: str = "balanced"
    kmeans_data: str = ""
    anchors: tuple[int, ...] = ()
    expert_heads: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "client_experts", "gate_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expert-routing: {_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ConfigError(f"expert-routing: top-k ({self.top_k}) must be <= experts ({self.experts})")
        if self.client_experts > self.experts:
            raise ConfigError(f"expert-routing: client-experts ({self.client_experts}) must be "
                              f"<= experts ({self.experts})")
        if self.top_k > self.client_experts:
            raise ConfigError(f"expert-routing: top-k ({self.top_k}) must be <= client-experts "
                              f"({self.client_experts}): a client routes each example among the "
                              "experts it trains")
        for name in ("balance_weight", "balance_rate", "route_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"expert-routing: {_key(name)} must be >= 0, got {getattr(self, name)}")
        if self.start not in STARTS:
            raise ConfigError(f"expert-routing: start must be one of {STARTS}, got {self.start!r}")
        if self.choice not in CHOICES:
            raise ConfigError(f"expert-routing: choice must be one of {CHOICES}, got {self.choice!r}")
        if self.start == "kmeans" and not self.kmeans_data:
            raise ConfigError("expert-routing: start=kmeans needs kmeans-data "
                              "(a CSV/JSONL of unlabelled public texts with a 'text' column)")
        if len(self.anchors) > self.experts:
            raise ConfigError(f"expert-routing: {len(self.anchors)} anchors for {self.experts} "
                              "experts (anchor i is pinned to expert i)")
        if len(set(self.anchors)) != len(self.anchors) or any(a < 0 for a in self.anchors):
            raise ConfigError(f"expert-routing: anchors must be distinct partition ids >= 0, "
                              f"got {list(self.anchors)}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ExpertConfig:
        """From ``aggregator-options`` keys (hyphenated); unknown keys and bad types fail."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"expert-routing: unknown option {key!r}; known: "
                                  f"{', '.join(_key(n) for n in known)}")
            kwargs[name] = _coerce_option(key, value, known[name].type)
        return cls(**kwargs)

    @property
    def structure(self) -> tuple[int, int]:
        """What the model's tensors depend on (the rest only changes how it runs)."""
        return self.experts, self.gate_hidden, self.expert_heads


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce_option(key: str, value: Any, annotation: str) -> Any:
    if annotation == "tuple[int, ...]":
        items = value if isinstance(value, list | tuple) else (
            [value] if isinstance(value, int) else [v for v in _LIST_SEPARATORS.split(str(value)) if v])
        try:
            return tuple(_coerce_option(key, v, "int") for v in items)
        except ConfigError as err:
            raise ConfigError(f"expert-routing: {key} must be partition ids separated by ':' "
                              f"(e.g. 0:5:10), got {value!r}") from err
    if annotation == "bool":
        text = str(value).strip().lower()
        if text not in ("true", "false", "1", "0"):
            raise ConfigError(f"expert-routing: {key} must be true or false, got {value!r}")
        return text in ("true", "1")
    kind = {"int": int, "float": float, "str": str}[annotation]
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"expert-routing: {key} must be of type {annotation}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"expert-routing: {key} must be of type {annotation}, got {value!r}") from err


# -- names -----------------------------------------------------------------------------

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


# -- routing ---------------------------------------------------------------------------

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


# -- modules ---------------------------------------------------------------------------

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


@dataclass
class MixtureOutput:
    """What ``model.model(**batch)`` returns: ``loss`` and ``logits`` like transformers, plus routing."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    gate_logits: torch.Tensor
    experts: torch.Tensor
    aux: dict[str, float] = field(default_factory=dict)


class MixtureNet(nn.Module):
    """Base model with expert layers, the gate and the routing forward."""

    def __init__(self, base: nn.Module, routing: Routing, dim: int, config: ExpertConfig):
        super().__init__()
        self.base = base
        self.routing = routing
        self.dim = dim
        self.config = config
        self.policy = RoutingPolicy()
        self.gate: Gate | None = None  # built, seeded, by MixtureModel
        self._memo: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> MixtureOutput:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        gate_logits = self.gate(self.embed(input_ids, mask))
        allowed = allowed_mask(self.config.experts, self.policy.allowed, gate_logits.device)
        index, weight = route(gate_logits, self.policy.top_k or self.config.top_k, allowed)
        self.routing.index, self.routing.weight = index, weight
        try:
            out = self.base(input_ids=input_ids, attention_mask=mask, labels=labels, **kwargs)
        finally:
            self.routing.index = self.routing.weight = None
        loss, aux = out.loss, {}
        if self.training and loss is not None:
            probs = gate_logits.float().softmax(-1)
            balance = balance_loss(probs)
            aux["balance"] = float(balance.detach())
            loss = loss + self.config.balance_weight * balance
            if allowed is not None:  # -log sum_{e in allowed} p_e, in log space
                logits = gate_logits.float()
                routed = (logits.logsumexp(-1) - logits[:, allowed].logsumexp(-1)).mean()
                aux["route"] = float(routed.detach())
                loss = loss + self.config.route_weight * routed
        return MixtureOutput(loss, out.logits, gate_logits, index, aux)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The common expert's embedding of each example (memoised by its tokens)."""
        keys = [ids[m.bool()].cpu().numpy().tobytes() for ids, m in zip(input_ids, attention_mask,
                                                                        strict=True)]
        missing = [i for i, key in enumerate(keys) if key not in self._memo]
        if missing:
            rows = torch.tensor(missing, device=input_ids.device)
            fresh = self.common_expert(input_ids.index_select(0, rows), attention_mask.index_select(0, rows))
            for i, vector in zip(missing, fresh.cpu(), strict=True):
                self._memo[keys[i]] = vector
                if len(self._memo) > MEMO_SIZE:
                    self._memo.popitem(last=False)
        return torch.stack([self._memo[key] for key in keys]).to(input_ids.device)

    def common_expert(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The base model's embedding with every expert off, in eval mode (not memoised)."""
        backbone = self.base.base_model  # transformers: the model without its task head
        was_training = backbone.training
        backbone.eval()
        try:
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            backbone.train(was_training)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(pooled.float(), dim=-1)


# -- the adapter model -------------------------------------------------------------------

class MixtureModel(AdapterModel):
    """E LoRA experts + gate + shared head as one named-tensor adapter (see the module doc)."""

    def __init__(self, net: MixtureNet, tokenizer: Any, spec: ModelSpec, layers: dict[str, ExpertLinear],
                 heads: dict[str, ExpertHead]):
        self.model = net
        self.tokenizer = tokenizer
        self.spec = spec
        self.layers = layers
        self.heads = heads
        self._base_originals: dict[str, torch.Tensor] = {}
        self._build()
        self._initial_head = {n: self._params[n].detach().clone() for n in self.head_names()}

    # -- structure ----------------------------------------------------------------------

    @property
    def config(self) -> ExpertConfig:
        return self.model.config

    @property
    def num_experts(self) -> int:
        return self.model.config.experts

    def configure(self, config: ExpertConfig) -> None:
        """Adopt a run's options; rebuilds experts and gate (seeded) only if their shapes change."""
        rebuild = config.structure != self.model.config.structure
        self.model.config = config
        if rebuild:
            self._build()

    def initial_state(self) -> Tensors:
        """Version 0: freshly initialised experts and gate from the options' seed, the base's head."""
        self._build()
        self.load_adapter_state(self._initial_head)
        return self.adapter_state()

    def _build(self) -> None:
        config = self.model.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for layer in self.layers.values():
                layer.reset(config.experts, self.spec.rank)
            for head in self.heads.values():
                head.reset(config.experts if config.expert_heads else 0)
            self.model.gate = Gate(self.model.dim, config.gate_hidden, config.experts).to(self.device)
        self._index_params()

    def _index_params(self) -> None:
        params: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            for e, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B, strict=True)):
                params[f"{expert_prefix(e)}{path}.lora_A.weight"] = a
                params[f"{expert_prefix(e)}{path}.lora_B.weight"] = b
        for path, head in self.heads.items():
            for kind in HEAD_DELTAS:
                for e, param in enumerate(getattr(head, kind)):
                    params[f"{expert_prefix(e)}{path}.{kind}"] = param
        for name, param in self.model.gate.named_parameters():
            params[GATE_PREFIX + name] = param
        corrections = {id(p) for p in params.values()}
        for name, param in self.model.base.named_parameters():  # the shared head
            if name.split(".")[0] in HEAD_MODULES and id(param) not in corrections:
                params[name] = param
        for param in params.values():
            param.requires_grad_(True)
        self._params = params
        self.adapter_names = tuple(params)

    def expert_names(self, experts: Sequence[int]) -> list[str]:
        wanted = set(experts)
        return [n for n in self.adapter_names if expert_of(n) in wanted]

    def gate_names(self) -> list[str]:
        return [n for n in self.adapter_names if n.startswith(GATE_PREFIX)]

    # -- routing ------------------------------------------------------------------------

    def set_policy(self, policy: RoutingPolicy) -> None:
        if policy.allowed is not None and not all(0 <= e < self.num_experts for e in policy.allowed):
            raise ValueError(f"routing policy names experts {policy.allowed}; model has {self.num_experts}")
        self.model.policy = policy

    @torch.no_grad()
    def embeddings(self, data: Encoded, batch_size: int = 64, memo: bool = True) -> torch.Tensor:
        """Common-expert embeddings of every example of ``data`` (``[N, dim]``)."""
        embed = self.model.embed if memo else self.model.common_expert
        pad = self.tokenizer.pad_token_id
        return torch.cat([embed(b["input_ids"], b["attention_mask"]) for b in
                          batches(data, batch_size, pad, shuffle=False, device=self.device)]).cpu()

    @torch.no_grad()
    def gate_probs(self, data: Encoded) -> torch.Tensor:
        """The current gate's unrestricted probabilities for every example (``[N, E]``)."""
        return self.model.gate(self.embeddings(data).to(self.device)).float().softmax(-1).cpu()

    # -- export -------------------------------------------------------------------------

    def export(self, directory: str | Path, state: Tensors | None = None, labels: tuple[str, ...] = (),
               experts: Sequence[int] | None = None) -> Path:
        """``expert-{e}/``: each expert (or only ``experts``, a client's personalised set) with
        the head as a standard peft adapter (top-1 routing to e is exactly that model);
        ``gate.safetensors`` and ``routing.json`` (which experts are there) beside them."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state() if state is None else state
        plain = build_model(self.spec, "cpu")
        kept = sorted(experts) if experts is not None else list(range(self.num_experts))
        for e in kept:
            plain.export(directory / f"expert-{e}", single_expert_state(state, e, self.head_names()), labels)
        save_file({n.removeprefix(GATE_PREFIX): state[n].contiguous() for n in self.gate_names()},
                  str(directory / "gate.safetensors"))
        config = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        (directory / "routing.json").write_text(json.dumps(
            {"options": config, "experts": kept, "layers": sorted(self.layers),
             "embedding": "mean-pooled, L2-normalised "
             "last hidden state of the base model with adapters disabled"}, indent=2))
        return directory


def build_mixture(spec: ModelSpec, device: torch.device | str = "cpu",
                  config: ExpertConfig | None = None) -> MixtureModel:
    """Frozen base model + E LoRA experts on its target modules + gate + trainable head."""
    if spec.rank <= 0:
        raise ConfigError(f"lora-rank must be > 0, got {spec.rank}")
    tokenizer = load_tokenizer(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        base = _base_model(spec, len(tokenizer))
    targets = resolve_targets(base, spec.target_modules)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    base.requires_grad_(False)
    base.to(device)
    routing = Routing()
    layers: dict[str, ExpertLinear] = {}
    for path, module in list(base.named_modules()):
        if path.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            parent_path, _, child = path.rpartition(".")
            layers[path] = ExpertLinear(module, routing, spec.alpha / spec.rank, spec.dropout)
            setattr(base.get_submodule(parent_path), child, layers[path])
    if not layers:
        raise ConfigError(f"target-modules: {targets} match no linear layer of {spec.name or 'minilm'}")
    heads: dict[str, ExpertHead] = {}
    for path in HEAD_MODULES:
        module = getattr(base, path, None)
        if isinstance(module, nn.Linear):
            heads[path] = ExpertHead(module, routing)
            setattr(base, path, heads[path])
    net = MixtureNet(base, routing, base.config.hidden_size, config or ExpertConfig(seed=spec.seed))
    return MixtureModel(net, tokenizer, spec, layers, heads)


# -- label-free gate initialisation -------------------------------------------------------

@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: float sums then round the same way in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spherical_kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """``k`` unit-norm centroids of unit-norm ``points`` (k-means++ seeding, cosine distance)."""
    if len(points) < k:
        raise ConfigError(f"expert-routing: k-means needs at least {k} texts, got {len(points)}")
    gen = torch.Generator().manual_seed(seed)
    centroids = [points[int(torch.randint(len(points), (1,), generator=gen))]]
    for _ in range(1, k):
        distance = (1 - points @ torch.stack(centroids).T).min(-1).values.clamp_min(1e-12)
        centroids.append(points[int(torch.multinomial(distance, 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (points @ c.T).argmax(-1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                c[j] = F.normalize(members.mean(0), dim=0)
    return c


def kmeans_gate_state(model: MixtureModel, texts: Sequence[str], max_length: int = 64) -> Tensors:
    """Gate tensors that route like nearest-centroid k-means of the common expert's embeddings.

    Embeddings are centred on their mean ``m``; expert e owns hidden unit e,
    ``h_e = tanh(s c_e . (x - m))``, and ``logit_e = gain * h_e``. The other hidden units
    keep their random initialisation and start with zero output weights.
    """
    ids = model.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    with single_thread():  # clients rebuild this state and the server checks its digest
        points = model.embeddings(Encoded(ids, [0] * len(ids)), memo=False)
        center = points.mean(0)
        centroids = spherical_kmeans(F.normalize(points - center, dim=-1), model.num_experts,
                                     model.config.seed)
    experts, hidden = model.num_experts, model.config.gate_hidden
    if hidden < experts:
        raise ConfigError(f"expert-routing: start=kmeans needs gate-hidden >= experts "
                          f"({hidden} < {experts})")
    state = {n: model.parameter(n).detach().cpu().clone() for n in model.gate_names()}
    scale = CENTROID_SHARPNESS / float((points - center).norm(dim=-1).mean())
    state["gate.hidden.weight"][:experts] = scale * centroids
    state["gate.hidden.bias"][:experts] = -scale * centroids @ center
    out = torch.zeros(experts, hidden)
    out[:, :experts] = torch.eye(experts) * GATE_OUT_GAIN / GATE_LOGIT_SCALE
    state["gate.out.weight"], state["gate.out.bias"] = out, torch.zeros(experts)
    return state
