"""The aggregation interface: a tiny server half and an optional client half per method.

Like ``torch.optim``, the interface is small so that many methods fit it:

* the server half (:class:`Aggregator`) says what the global state is, gives each
  sampled client its per-round instructions, and folds decoded client updates into
  a new global *delta* (``begin`` / ``accumulate`` / ``finalize``: streaming, so
  memory does not grow with the number of clients where the math allows);
* the client half (:class:`ClientPart`, found on the client through the same
  registry name) loads the global state into a model, prepares local training
  (freezing, selection) and computes the update the client sends.

Both halves of a method live in one module (a method that needs several: one package,
such as ``expert_routing/``). Nothing here imports Flower, the server
or the client: aggregators are tensor math over named tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from pollinate.aggregators.options import MethodOptions, describe, parse_options
from pollinate.config import ConfigError, RunConfig
from pollinate.data import Encoded
from pollinate.modeling import AdapterModel, ModelSpec, build_model
from pollinate.spec import AdapterSpec, Tensors

Instructions = dict[str, bool | int | float | str]
DENSE_FALLBACK = "int8-row"  # what a method that needs whole factors gets instead of top-k or sign


def needs_error_feedback(encoding: str) -> bool:
    """Whether ``encoding`` drops so much of a tensor (top-k: most entries; sign, sign2: all but
    one or two magnitudes per slice) that only error feedback over rounds makes up for it."""
    return encoding.startswith("topk") or encoding.startswith("sign")


class AggregationError(ValueError):
    """An update cannot be aggregated (wrong names, ranks or shapes for this method)."""


@dataclass
class ClientUpdate:
    """One client's decoded contribution to a round."""

    node_id: int
    delta: Tensors
    num_examples: int
    rank: int
    alpha: float
    metrics: dict[str, float] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class ClientPart:
    """Client half of a method. The default trains every adapter tensor and sends the change."""

    def __init__(self, options: Mapping[str, Any], instructions: Mapping[str, Any],
                 node: Mapping[str, Any] | None = None):
        self.options = dict(options)
        self.instructions = dict(instructions)
        self.node = dict(node or {})  # this node's Flower node config (budgets, rank, device)

    def load_global(self, model: AdapterModel, state: Tensors) -> None:
        """Make ``model`` the global model described by ``state``."""
        model.load_adapter_state({n: t for n, t in state.items() if n in model.adapter_names})

    def prepare(self, model: AdapterModel, data: Encoded,
                probe: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Called before local training with the local data and a few of its batches.

        ``probe`` serves gradient-based choices (selective layers); ``data`` serves
        methods that look at every local example (expert routing scores them all).
        """
        model.set_trainable(model.adapter_names)

    def update(self, model: AdapterModel, start: Tensors) -> Tensors:
        """The tensors to send: what changed in the trainable adapter tensors."""
        trained = model.adapter_state()
        return {n: trained[n] - start[n] for n in model.adapter_names
                if model.parameter(n).requires_grad}

    def unpack_downlink(self, wire: Tensors) -> Tensors:
        """Inverse of :meth:`Aggregator.pack_downlink`: a delta in global-state space."""
        return wire

    def report(self) -> dict[str, bool | int | float | str]:
        """Extra metrics/capabilities sent with the update (numbers or strings)."""
        return {}

    @property
    def uses_error_feedback(self) -> bool:
        """Whether the uplink residual of one round is meaningful in the next."""
        return True


class Aggregator:
    """Server half of a method. Subclasses override the few methods they need.

    The default is plain weighted averaging of deltas over the clients that sent each
    tensor (a tensor nobody sent stays unchanged); :mod:`fedit` is exactly this.
    """

    name: ClassVar[str] = ""
    client_part: ClassVar[type[ClientPart]] = ClientPart
    sparse_wire: ClassVar[bool] = True
    """Whether the method learns through top-k and sign codecs: true for methods that send changes
    (error feedback re-sends what the codec drops); false for methods that send whole fresh
    factors each round, which keeping 10% of the entries or their signs destroys (docs/aggregators.md)."""
    server_optimizer_refusal: ClassVar[str] = ""
    """Why a server optimizer (``server-optimizer``) must not step on this method's global delta;
    empty when :meth:`finalize` returns an aggregate of the clients' changes (a pseudo-gradient),
    as the default weighted mean does. A method whose delta also carries a server-side
    correction (a re-projection, a balancing step) says why here and the pair is refused."""
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    """The method's options as a dataclass (:mod:`.options`); ``self.config`` holds them parsed.
    A method that declares none (a custom one taking ``**options``) keeps its raw options
    in ``self.options`` and only ``seed`` is parsed."""

    def __init__(self, **options: Any):
        self.options = options
        self.config = self.parse_options(options)
        self._sums: Tensors = {}
        self._weights: dict[str, float] = {}
        self.round = 0

    @classmethod
    def declares_options(cls) -> bool:
        """Whether the method (or a method it extends) declares its own :attr:`Options`."""
        return any("Options" in vars(klass) for klass in cls.__mro__ if klass is not Aggregator)

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> MethodOptions:
        """``aggregator-options`` as :attr:`Options`, or a :class:`ConfigError` naming the method,
        the option and what is allowed (an unknown name: the closest known ones)."""
        return parse_options(cls.Options, options, cls.name or cls.__name__, strict=cls.declares_options())

    @classmethod
    def option_rows(cls) -> list[tuple[str, str, str, str]]:
        """``(option, type, default, help)`` of each option, for ``pollinate aggregators``."""
        rows = describe(cls.Options)
        if not cls.declares_options():
            rows.append(("(any)", "", "", "free-form: no Options dataclass, the method reads its raw "
                                          "options"))
        return rows

    @classmethod
    def settle_config(cls, config: RunConfig, note: Callable[[str], Any]) -> RunConfig:
        """``config`` made workable for this method before round 1, or a :class:`ConfigError`.

        A method that cannot learn through top-k or sign codecs gets ``int8-row`` in place of
        such a default codec (and ``note`` says so); one the user chose is refused with the
        option to change.
        """
        cls.check_optimizers(config)
        if cls.sparse_wire:
            return config
        changes = {}
        defaults = RunConfig()
        for option, fallback in (("codec", DENSE_FALLBACK), ("downlink_codec", DENSE_FALLBACK)):
            chosen = getattr(config, option)
            if not needs_error_feedback(chosen):
                continue
            key = option.replace("_", "-")
            if chosen != getattr(defaults, option):
                raise ConfigError(f"aggregator={config.aggregator} learns nothing through the coarse "
                                  f"{key}={chosen} (it sends whole factors); set {key} to {fallback}, "
                                  "fp16 or fp32")
            changes[option] = fallback
        if changes:
            note(f"aggregator={config.aggregator} learns nothing through top-k or sign codecs: using "
                 + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in changes.items())
                 + " (set codec / downlink-codec to choose)")
        return config.replace(**changes)

    @classmethod
    def check_optimizers(cls, config: RunConfig) -> None:
        """Refuse ``server-optimizer`` and ``client-optimizer-state`` where this method defeats them."""
        if config.server_optimizer != "none" and cls.server_optimizer_refusal:
            raise ConfigError(f"server-optimizer={config.server_optimizer} does not work with aggregator="
                              f"{config.aggregator}: {cls.server_optimizer_refusal}; set server-optimizer "
                              "to none or choose another aggregator")
        if config.client_optimizer_state and not cls.client_part(config.aggregator_option_map,
                                                                 {}).uses_error_feedback:
            raise ConfigError("client-optimizer-state=true does not work with aggregator="
                              f"{config.aggregator}: its clients train freshly initialised LoRA "
                              "factors every round, so last round's optimizer state belongs to other "
                              "parameters; set client-optimizer-state to false or choose another "
                              "aggregator")

    # -- what the model and the global state are -------------------------------------

    @classmethod
    def build_model(cls, spec: ModelSpec, device: torch.device | str) -> AdapterModel:
        """The model both halves work on; methods with extra structure (experts, gates) override."""
        return build_model(spec, device)

    def initial_state(self, model: AdapterModel) -> Tensors:
        """Global state at version 0, rebuilt identically by every client from the seed."""
        return model.adapter_state()

    def uplink_spec(self, model: AdapterModel) -> AdapterSpec:
        """What a client may send: adapter tensor names, rank axes free."""
        return AdapterSpec.of(model.adapter_state(), free_rank=True)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        """What the server may send: names and shapes of the global state."""
        return AdapterSpec.of(self.initial_state(model), free_rank=True)

    # -- per-round client instructions --------------------------------------------------

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, Instructions]:
        """Per-client instructions for this round, sent in the round's config."""
        return {node: {} for node in node_ids}

    # -- aggregation ----------------------------------------------------------------

    def begin(self, rnd: int, state: Tensors) -> None:
        """Start a round whose clients trained from global ``state``."""
        self.round = rnd
        self.state = state
        self._sums, self._weights = {}, {}

    def check(self, update: ClientUpdate) -> None:
        """Raise :class:`AggregationError` if ``update`` cannot be folded in (nothing is changed)."""
        if update.num_examples <= 0:
            raise AggregationError(f"client {update.node_id}: num-examples must be > 0")
        for name, tensor in update.delta.items():
            if name not in self.state:
                raise AggregationError(f"client {update.node_id}: unknown tensor {name!r}")
            if tensor.shape != self.state[name].shape:
                raise AggregationError(
                    f"client {update.node_id}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"global is {tuple(self.state[name].shape)} (rank {update.rank}; "
                    f"use an aggregator for heterogeneous ranks such as flora or hetlora)")

    def accumulate(self, update: ClientUpdate) -> None:
        """Fold one checked update into running sums."""
        for name, tensor in update.delta.items():
            self._fold(name, tensor, float(update.num_examples))

    def finalize(self) -> Tensors:
        """The global delta of the round: the weighted mean for every tensor someone sent."""
        return {n: s / self._weights[n] for n, s in self._sums.items()}

    def metrics(self) -> dict[str, float]:
        """Round-level metrics of the method (reported in metrics.jsonl)."""
        return {}

    def plots(self, rounds: list[dict[str, Any]], directory: Path) -> list[Path]:
        """Method-specific PNGs written into the run directory at the end (``rounds`` = metrics)."""
        return []

    def pack_downlink(self, delta: Tensors, *, latest_round: bool) -> Tensors:
        """Wire form of a global delta (``latest_round``: it is the last ``finalize`` result).

        The default sends the delta as it is; a method may send something cheaper that
        its :meth:`ClientPart.unpack_downlink` turns back into state space.
        """
        return delta

    # -- helpers for subclasses ---------------------------------------------------------

    def _fold(self, name: str, tensor: torch.Tensor, weight: float) -> None:
        term = tensor.to(torch.float32) * weight
        if name in self._sums:
            self._sums[name] += term
        else:
            self._sums[name] = term.clone()
        self._weights[name] = self._weights.get(name, 0.0) + weight
