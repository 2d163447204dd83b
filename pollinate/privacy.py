"""Differential-privacy building blocks shared by the client and the server.

Both halves need the same few things: an RDP accountant whose state survives between
rounds (as bytes), the noise multiplier that meets a target epsilon, L2 clipping and
Gaussian noise on named tensors, and the check that a model's adapter can be trained
privately by opacus. The client (sample-level DP, local client-level DP) and the server
(central client-level DP) build on these; neither imports the other.

Noise and Poisson sampling draw from generators seeded by the operating system, never
from the run seed: the run seed is known to the server and to every client, so noise
derived from it could be reproduced and subtracted, which would void the guarantee
(the one exception is a test-only switch, :data:`INSECURE_NOISE_SEED`, off unless set).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from peft import PeftType
from peft.tuners import lora
from torch import nn

from pollinate.config import ConfigError, RunConfig
from pollinate.spec import Tensors

SOLVE = -1.0  # noise-multiplier value meaning "solve it from target-epsilon"
INSECURE_NOISE_SEED = "POLLINATE_INSECURE_NOISE_SEED"  # tests only, see secret_generator


class PrivacyError(ConfigError):
    """A DP setting cannot be honoured for this model, method or budget."""


# -- accounting ----------------------------------------------------------------------


class Budget:
    """An RDP accountant plus its target: epsilon spent so far and whether more fits.

    The history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the
    opacus accountant's own state, stored as JSON bytes between rounds.
    """

    def __init__(self, target_epsilon: float, delta: float, history: list | None = None):
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = RDPAccountant()
        self.accountant.history = [tuple(entry) for entry in history or []]

    @classmethod
    def from_bytes(cls, blob: bytes | None, target_epsilon: float, delta: float) -> Budget:
        return cls(target_epsilon, delta, json.loads(blob) if blob else [])

    def to_bytes(self) -> bytes:
        return json.dumps(self.accountant.history).encode()

    @property
    def history(self) -> list[tuple]:
        return self.accountant.history

    @history.setter
    def history(self, history: list[tuple]) -> None:
        self.accountant.history = list(history)

    @property
    def steps(self) -> int:
        return sum(int(steps) for _, _, steps in self.accountant.history)

    def spent(self) -> float:
        """Epsilon at ``delta`` after everything recorded so far (0 before any step)."""
        return epsilon_of(self.accountant.history, self.delta)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        for _ in range(steps):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def allows(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether ``steps`` more steps at this noise and sampling rate stay within the target."""
        after = self.accountant.history + [(noise_multiplier, sample_rate, steps)]
        return epsilon_of(after, self.delta) <= self.target_epsilon


def epsilon_of(history: list, delta: float) -> float:
    """Epsilon of an opacus RDP history; infinite when any step had no noise."""
    if not history:
        return 0.0
    if any(noise <= 0 for noise, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def noise_multiplier(config: RunConfig, sample_rate: float, steps: int) -> float:
    """``noise-multiplier`` as given, else the smallest one meeting ``target-epsilon`` after ``steps``."""
    if config.noise_multiplier != SOLVE:
        return config.noise_multiplier
    return solve_noise(config.target_epsilon, config.delta, sample_rate, steps)


def solve_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` steps at ``sample_rate`` stay within the target."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant="rdp"))
    except ValueError as err:
        raise PrivacyError(f"target-epsilon={target_epsilon} cannot be met in {steps} steps at "
                           f"sampling rate {sample_rate:.4g}: {err}") from err


# -- clipping and noise on named tensors ------------------------------------------------


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors taken together (the update as one flat vector)."""
    return math.sqrt(sum(float(t.detach().to(torch.float32).pow(2).sum()) for t in tensors.values()))


def clip(tensors: Mapping[str, torch.Tensor], max_norm: float) -> Tensors:
    """Scale the tensors together so that their joint L2 norm is at most ``max_norm`` (flat clipping)."""
    scale = min(1.0, max_norm / (l2_norm(tensors) + 1e-12))
    return {n: t.to(torch.float32) * scale for n, t in tensors.items()}


def add_noise(tensors: Mapping[str, torch.Tensor], std: float,
              generator: torch.Generator | None = None) -> Tensors:
    """``tensors`` plus i.i.d. N(0, std^2) noise (CPU float32), from ``generator`` or a secret one."""
    generator = generator or secret_generator()
    return {n: t.to("cpu", torch.float32)
            + std * torch.randn(t.shape, generator=generator, dtype=torch.float32)
            for n, t in tensors.items()}


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the operating system's entropy, unknown to every other party.

    Tests only: with the environment variable :data:`INSECURE_NOISE_SEED` set to an
    integer, the seed is drawn from torch's global RNG (which the client seeds per round
    and partition) mixed with that integer, so DP runs repeat exactly. That noise is
    **not private**: anyone who knows the run seed can reproduce and subtract it.
    """
    insecure = os.environ.get(INSECURE_NOISE_SEED)
    if insecure is not None:
        seed = int(torch.randint(2**62, (1,))) ^ int(insecure)
    else:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


# -- which adapters opacus can train privately ------------------------------------------


def check_private(net: nn.Module) -> None:
    """Raise :class:`PrivacyError` unless opacus can compute exact per-sample gradients of ``net``.

    Refused: prompt/prefix tuning and every non-LoRA peft method, DoRA, LoRA on embedding
    layers, peft's ``modules_to_save`` wrappers, and any trainable module without an opacus
    per-sample-gradient rule.
    """
    for name, config in getattr(net, "peft_config", {}).items():
        if config.peft_type != PeftType.LORA:
            raise PrivacyError(f"dp=sample: adapter {name!r} is {config.peft_type.value}; opacus cannot "
                               "compute per-sample gradients of prompt/prefix tuning or other non-LoRA "
                               "adapters correctly, use LoRA")
        if getattr(config, "use_dora", False):
            raise PrivacyError(f"dp=sample: adapter {name!r} uses DoRA, whose weight normalisation mixes "
                               "examples in opacus' per-sample gradients; use plain LoRA")
        if config.modules_to_save:
            raise PrivacyError(f"dp=sample: adapter {name!r} trains {config.modules_to_save} through peft's "
                               "modules_to_save wrapper, which opacus cannot hook; train the head directly")
    for name, module in net.named_modules():
        if isinstance(module, lora.Embedding):
            raise PrivacyError(f"dp=sample: LoRA on embedding layer {name!r} is not supported by opacus; "
                               "remove embedding layers from target-modules")
        trainable = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if trainable and type(module) not in GradSampleHooks.GRAD_SAMPLERS:
            raise PrivacyError(f"dp=sample: trainable module {name!r} ({type(module).__name__}) has no "
                               "opacus per-sample gradient rule")
