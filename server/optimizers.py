"""Server optimizers: what the server applies, given the round's global delta (``server-optimizer``).

Every aggregator's ``finalize`` returns the round's global delta ``d`` (the new global
state minus the old); Reddi et al. (2021, "Adaptive Federated Optimization") read ``-d``
as a pseudo-gradient and give the server its own optimizer over it. One small class per
optimizer, in the manner of ``torch.optim`` but over named tensors: :meth:`ServerOptimizer.step`
takes ``d`` and returns the delta the server applies (and sends).

With ``lr`` = ``server-learning-rate``, ``b1`` = ``server-momentum``, ``b2`` =
``server-beta2``, ``tau`` = ``server-tau`` and per-tensor state starting at zero:

* ``none``: ``d`` as it is (plain FedAvg of whatever the aggregator averaged).
* ``avgm`` (FedAvgM, Hsu et al. 2019; Flower's ``FedAvgM``): ``m = b1 m + d``, apply ``lr m``.
* ``adam``: ``m = b1 m + (1 - b1) d``, ``v = b2 v + (1 - b2) d^2``, apply
  ``lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + tau)``, ``t`` = the tensor's step count.
  That is Flower's ``FedAdam`` (bias-corrected step size, ``tau`` outside the root) with
  ``t`` counted from 1; Flower 1.39 uses ``server_round + 1``, one step ahead, so its
  first round is bias-corrected as if it were the second. Reddi et al. omit the correction.
* ``yogi``: ``m`` as adam, ``v = v - (1 - b2) d^2 sign(v - d^2)``, apply ``lr m / (sqrt(v) + tau)``
  (Reddi et al.; Flower's ``FedYogi``: no bias correction, ``v`` starts at 0).
* ``adagrad``: ``m`` as adam, ``v = v + d^2``, apply ``lr m / (sqrt(v) + tau)`` (Reddi et al.,
  with their momentum ``b1``; Flower's ``FedAdagrad`` is the case ``b1 = 0``).

``server-learning-rate`` 0 means the optimizer's own default: 1 for avgm (with
``b1 = 0`` it is then exactly ``none``), 0.01 for the adaptive ones (Flower's FedYogi):
their step is about ``lr`` per coordinate whatever the size of ``d``, while a round of
local AdamW moves a LoRA coordinate by at most about its learning rate times its steps
(5e-3 x 10 in the benchmarks); Flower's 0.1 for FedAdam would move every adapter entry by
~0.1 a round. A reduced BANKING77 run found 0.01 and 0.05 slower than FedAvg over 8
rounds (docs/benchmarks.md): the issue's sweep should set this default.

State is per tensor name and only tensors present in ``d`` step (a "lazy" optimizer): a
tensor nobody sent this round (a block selective-layer did not train, FFA's frozen A)
stays unchanged and keeps its state, as it does without a server optimizer. The state
round-trips through :meth:`state_dict` / :meth:`load_state_dict` as flat named tensors
(``<slot>/<tensor name>``), which the checkpoint stores as safetensors.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from pollinate.config import RunConfig
from pollinate.spec import Tensors

STEP = "step"


class ServerOptimizer:
    """``none``: the delta as it is. Subclasses keep per-tensor ``slots`` and override :meth:`update`."""

    name: ClassVar[str] = "none"
    slots: ClassVar[tuple[str, ...]] = ()
    default_learning_rate: ClassVar[float] = 1.0

    def __init__(self, learning_rate: float = 0.0, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3):
        self.learning_rate = learning_rate or self.default_learning_rate
        self.momentum, self.beta2, self.tau = momentum, beta2, tau
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, delta: Tensors) -> Tensors:
        """The delta to apply for the aggregator's global ``delta`` (fp32, same names)."""
        if not self.slots:
            return delta
        out: Tensors = {}
        for name, tensor in delta.items():
            d = tensor.to(torch.float32)
            state = self.state.get(name)
            if state is None:
                state = {slot: torch.zeros_like(d) for slot in self.slots}
                state[STEP] = torch.zeros((), dtype=torch.int64)
                self.state[name] = state
            state[STEP] += 1
            out[name] = self.update(state, d, int(state[STEP]))
        return out

    def update(self, state: dict[str, torch.Tensor], d: torch.Tensor, t: int) -> torch.Tensor:
        """Update ``state`` in place for delta ``d`` at step ``t`` (from 1); the delta to apply."""
        raise NotImplementedError

    def state_dict(self) -> Tensors:
        """Flat ``<slot>/<tensor name>`` tensors (empty for ``none``)."""
        return {f"{slot}/{name}": value
                for name, state in self.state.items() for slot, value in state.items()}

    def load_state_dict(self, tensors: Tensors) -> None:
        """Restore what :meth:`state_dict` returned; slots of another optimizer are refused."""
        state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            slot, _, name = key.partition("/")
            if slot not in (*self.slots, STEP) or not name:
                raise ValueError(f"server optimizer {self.name}: unexpected state {key!r}")
            state.setdefault(name, {})[slot] = value.clone()
        for name, slots in state.items():
            missing = {*self.slots, STEP} - set(slots)
            if missing:
                raise ValueError(f"server optimizer {self.name}: tensor {name!r} lacks {sorted(missing)}")
        self.state = state


class AvgM(ServerOptimizer):
    """Server momentum (FedAvgM), in torch's SGD convention: ``m = b1 m + d``, apply ``lr m``."""

    name = "avgm"
    slots = ("momentum",)

    def update(self, state: dict[str, torch.Tensor], d: torch.Tensor, t: int) -> torch.Tensor:
        m = state["momentum"].mul_(self.momentum).add_(d)
        return self.learning_rate * m


class Adaptive(ServerOptimizer):
    """The shared part of adam, yogi and adagrad: the first moment and the normalised step."""

    slots = ("exp_avg", "exp_avg_sq")
    default_learning_rate = 1e-2

    def update(self, state: dict[str, torch.Tensor], d: torch.Tensor, t: int) -> torch.Tensor:
        m = state["exp_avg"].mul_(self.momentum).add_(d, alpha=1.0 - self.momentum)
        v = self.second_moment(state["exp_avg_sq"], d)
        return self.step_size(t) * m / (v.sqrt() + self.tau)

    def second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step_size(self, t: int) -> float:
        return self.learning_rate


class Adam(Adaptive):
    name = "adam"

    def second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return v.mul_(self.beta2).addcmul_(d, d, value=1.0 - self.beta2)

    def step_size(self, t: int) -> float:
        return self.learning_rate * math.sqrt(1.0 - self.beta2 ** t) / (1.0 - self.momentum ** t)


class Yogi(Adaptive):
    name = "yogi"

    def second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        square = d * d
        return v.sub_((1.0 - self.beta2) * square * torch.sign(v - square))


class Adagrad(Adaptive):
    name = "adagrad"

    def second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return v.addcmul_(d, d)


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (ServerOptimizer, AvgM, Adam, Yogi, Adagrad)}
"""By ``server-optimizer`` name; the names are :data:`pollinate.config.SERVER_OPTIMIZERS`."""


def server_optimizer(config: RunConfig) -> ServerOptimizer:
    """The run's ``server-optimizer`` with its hyperparameters (validated by :class:`RunConfig`)."""
    return OPTIMIZERS[config.server_optimizer](
        config.server_learning_rate, config.server_momentum, config.server_beta2, config.server_tau)
