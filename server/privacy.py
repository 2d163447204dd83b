"""Client-level differential privacy on the server (DP-FedAvg), wrapped around any aggregator.

:class:`CentralDP` clips each client's decoded update to ``clip-norm`` C as one flat
vector, sums the clipped updates with uniform weights, adds N(0, (sigma C)^2) to every
coordinate of every tensor a client may send and divides by the number m of clients
sampled for the round (the fixed denominator of DP-FedAvg: one client changes the mean
by at most C/m whatever it sends). That noisy mean is handed to the wrapped method as
the round's only update, so whatever the method then computes (FedIT's mean, HetLoRA's
norm weights, ...) is post-processing of a private release.

The client-level epsilon comes from opacus' RDP accountant with one step per aggregated
round at sampling rate m / N, N the nodes the grid reports for that round (not the
configured ``num-clients``). The server draws the m nodes with a secret RNG, so the
amplification by subsampling holds against anyone who knows the run seed; the accountant
assumes Poisson sampling, the server samples m uniformly without replacement, the usual
approximation (docs/privacy.md). Sigma is solved once, at the run's first round, and
stored with the accountant's history in the checkpoint: a resumed run keeps both, and a
round that would exceed ``target-epsilon`` is refused before any node is sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pollinate.aggregators import AggregationError, Aggregator, ClientUpdate
from pollinate.aggregators.base import Instructions
from pollinate.config import RunConfig
from pollinate.modeling import AdapterModel
from pollinate.privacy import SOLVE, Budget, PrivacyError, add_noise, check_private, clip, solve_noise
from pollinate.spec import AdapterSpec, Tensors


class CentralDP(Aggregator):
    """Clip, sum, noise and average client updates, then let ``inner`` aggregate the noisy mean.

    ``noise_multiplier`` may be :data:`SOLVE`: the first :meth:`plan` solves it for
    ``rounds`` rounds at that round's sampling rate, and it stays fixed for the run.
    """

    def __init__(self, inner: Aggregator, *, template: Tensors, rank: int, alpha: float,
                 clip_norm: float, noise_multiplier: float, budget: Budget, rounds: int,
                 generator: torch.Generator | None = None):
        super().__init__(**inner.options)
        self.inner = inner
        self.name = inner.name
        self.template = {n: torch.zeros(t.shape) for n, t in template.items()}
        self.rank, self.alpha = rank, alpha
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.budget, self.rounds = budget, rounds
        self.generator = generator
        self._sampled = 0
        self._round: dict[str, Any] = {}  # this round's population, sample, rate, or why it was refused

    # -- accounting across the run ----------------------------------------------------------

    def plan(self, rnd: int, population: int, sampled: int) -> bool:
        """Whether round ``rnd`` may run with ``sampled`` of the ``population`` nodes the grid reports."""
        rate = min(1.0, sampled / population)
        if self.noise_multiplier == SOLVE:
            self.noise_multiplier = solve_noise(self.budget.target_epsilon, self.budget.delta, rate,
                                                self.rounds)
        self._round = {"population": population, "sampled": sampled, "sample_rate": rate}
        if self.budget.allows(self.noise_multiplier, rate, 1):
            return True
        self._round["refused"] = (f"round {rnd} refused: epsilon {self.epsilon:.4g} spent, one more round "
                                  f"at sampling rate {rate:.4g} and noise multiplier "
                                  f"{self.noise_multiplier:.4g} would exceed target-epsilon "
                                  f"{self.budget.target_epsilon:g}")
        return False

    def accounting(self) -> dict[str, Any]:
        """What a checkpoint keeps: the run's sigma and the accountant's exact history."""
        return {"noise_multiplier": self.noise_multiplier, "history": [list(h) for h in self.budget.history]}

    def restore_accounting(self, state: dict[str, Any]) -> None:
        self.noise_multiplier = float(state["noise_multiplier"])
        self.budget.history = [tuple(h) for h in state["history"]]

    # -- delegated ----------------------------------------------------------------------

    def initial_state(self, model: AdapterModel) -> Tensors:
        return self.inner.initial_state(model)

    def uplink_spec(self, model: AdapterModel) -> AdapterSpec:
        return self.inner.uplink_spec(model)

    def downlink_spec(self, model: AdapterModel) -> AdapterSpec:
        return self.inner.downlink_spec(model)

    def pack_downlink(self, delta: Tensors, *, latest_round: bool) -> Tensors:
        return self.inner.pack_downlink(delta, latest_round=latest_round)

    def plots(self, rounds: list[dict[str, Any]], directory: Path) -> list[Path]:
        return self.inner.plots(rounds, directory)

    def instructions(self, rnd: int, node_ids: Sequence[int]) -> dict[int, Instructions]:
        self._sampled = len(node_ids)  # m: the fixed denominator of this round's mean
        return self.inner.instructions(rnd, node_ids)

    # -- the mechanism --------------------------------------------------------------------

    def begin(self, rnd: int, state: Tensors) -> None:
        super().begin(rnd, state)
        self.inner.begin(rnd, state)
        self._count = 0

    def check(self, update: ClientUpdate) -> None:
        self.inner.check(update)
        for name, tensor in update.delta.items():
            want = self.template.get(name)
            if want is None or tensor.shape != want.shape:
                raise AggregationError(
                    f"client {update.node_id}: client-level DP averages updates of one shape; tensor "
                    f"{name!r} has shape {tuple(tensor.shape)}, expected "
                    f"{None if want is None else tuple(want.shape)} (rank {update.rank} vs {self.rank})")

    def accumulate(self, update: ClientUpdate) -> None:
        for name, tensor in clip(update.delta, self.clip_norm).items():
            self._fold(name, tensor, 1.0)
        self._count += 1

    def finalize(self) -> Tensors:
        m = max(self._sampled, self._count)
        summed = {n: self._sums.get(n, zero) for n, zero in self.template.items()}
        noisy = add_noise(summed, self.noise_multiplier * self.clip_norm, self.generator)
        mean = ClientUpdate(node_id=-1, delta={n: t / m for n, t in noisy.items()}, num_examples=1,
                            rank=self.rank, alpha=self.alpha)
        self.inner.check(mean)
        self.inner.accumulate(mean)
        self.budget.step(self.noise_multiplier, self._round["sample_rate"])
        return self.inner.finalize()

    @property
    def epsilon(self) -> float:
        return self.budget.spent()

    def metrics(self) -> dict[str, float]:
        return {**self.inner.metrics(), **self._round, "epsilon": self.epsilon,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "dp_steps": self.budget.steps}


def private_aggregator(aggregator: Aggregator, config: RunConfig, model: AdapterModel,
                       generator: torch.Generator | None = None) -> Aggregator:
    """``aggregator`` as the run's DP setting needs it; refuses settings DP cannot honour.

    ``sample``: the model's adapter must be one opacus trains privately (checked here so
    the run fails before any round). ``client-*``: the method's client update must be a
    change of the adapter (clipping re-initialised full factors, as FLoRA and FlexLoRA send,
    bounds nothing meaningful); ``client-central`` also needs one rank for every client.
    """
    if config.dp == "sample":
        check_private(model.model)
    if config.dp not in ("client-central", "client-local"):
        return aggregator
    part = type(aggregator).client_part(aggregator.options, {})
    if not part.uses_error_feedback:
        raise PrivacyError(f"dp={config.dp}: aggregator {config.aggregator!r} sends full re-initialised "
                           "LoRA factors rather than changes, which client-level clipping cannot bound; "
                           "use fedit, ffa or hetlora, or dp=sample")
    if config.dp == "client-local":
        return aggregator
    ranks = {config.rank_for(i) for i in range(config.num_clients)}
    if ranks != {model.spec.rank}:
        raise PrivacyError(f"dp=client-central sums updates of one shape: every client needs LoRA rank "
                           f"{model.spec.rank}, rank-profile gives {sorted(ranks)}")
    template = {n: t for n, t in model.adapter_state().items() if n in aggregator.uplink_spec(model)}
    aggregator.begin(0, aggregator.initial_state(model))
    try:  # the method must accept one anonymous update (no per-client reports) in each round
        aggregator.check(ClientUpdate(-1, {n: torch.zeros(t.shape) for n, t in template.items()}, 1,
                                      model.spec.rank, model.spec.alpha))
    except AggregationError as err:
        raise PrivacyError(f"dp=client-central: aggregator {config.aggregator!r} cannot aggregate the "
                           f"one noisy mean client-level DP releases per round: {err}") from err
    return CentralDP(aggregator, template=template, rank=model.spec.rank, alpha=model.spec.alpha,
                     clip_norm=config.clip_norm, noise_multiplier=config.noise_multiplier,
                     budget=Budget(config.target_epsilon, config.delta), rounds=config.num_server_rounds,
                     generator=generator)


def privacy_state(aggregator: Aggregator) -> dict[str, Any] | None:
    """The server's DP state a checkpoint must keep (``None`` without client-central DP)."""
    return aggregator.accounting() if isinstance(aggregator, CentralDP) else None


def restore_privacy(aggregator: Aggregator, state: dict[str, Any] | None) -> None:
    """Put a checkpoint's sigma and accountant history back; refuse to resume without them."""
    if not isinstance(aggregator, CentralDP):
        return
    if state is None:
        raise PrivacyError("the checkpoint holds no client-level DP accountant (written before it was "
                           "stored); resuming would misreport epsilon, start a new run instead")
    aggregator.restore_accounting(state)


def round_privacy(aggregator: Aggregator, clients: list[dict[str, Any]]) -> dict[str, float]:
    """The round's epsilon: the server's (central DP) or the largest a used client reported."""
    if isinstance(aggregator, CentralDP):
        return {"epsilon": aggregator.epsilon}
    reported = [c["epsilon"] for c in clients if c.get("used") and "epsilon" in c]
    return {"epsilon": max(reported)} if reported else {}
