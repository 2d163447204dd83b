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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pollinate.aggregators.expert_routing.config import ExpertConfig
from pollinate.aggregators.expert_routing.layers import ExpertHead, ExpertLinear, Gate
from pollinate.aggregators.expert_routing.routing import (
    Routing,
    RoutingPolicy,
    allowed_mask,
    balance_loss,
    route,
)
from pollinate.aggregators.expert_routing.tensors import (
    GATE_PREFIX,
    HEAD_DELTAS,
    expert_of,
    expert_prefix,
    single_expert_state,
)
from pollinate.config import ConfigError
from pollinate.data import Encoded, batches
from pollinate.modeling import (
    AdapterModel,
    ModelSpec,
    _base_model,
    build_model,
    load_tokenizer,
    resolve_targets,
)
from pollinate.spec import HEAD_MODULES, Tensors

MEMO_SIZE = 65536  # common-expert embeddings kept per process (384 floats each for MiniLM)


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
