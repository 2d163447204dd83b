"""Client-side differential privacy: DP-SGD on the adapter, or noise on the whole update.

``dp=sample`` trains the trainable adapter tensors (whatever the method's ClientPart left
trainable) with opacus: Poisson-sampled batches, per-sample gradients clipped to
``max-grad-norm``, Gaussian noise. ``dp=client-local`` clips this client's update to
``clip-norm`` and noises it before it is compressed. Either way the node's RDP
accountant lives in its Flower node state, so epsilon keeps growing across rounds, and
a node whose budget would be exceeded by another round refuses to train ("exhausted").

The model is cached and shared by rounds and virtual clients, so opacus never wraps it:
its hooks are attached to the model itself for one round and removed afterwards, so no
``_module.`` prefix or per-sample state outlives the round.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator

from pollinate.config import RunConfig
from pollinate.data import Encoded, collate
from pollinate.modeling import AdapterModel
from pollinate.privacy import Budget, add_noise, check_private, clip, noise_multiplier, secret_generator
from pollinate.spec import Tensors

from .state import NodeMemory
from .trainer import TrainResult, make_optimizer

ACCOUNTANT = "dp-accountant"  # NodeMemory.extra key of the opacus RDP history


@dataclass(frozen=True)
class Plan:
    """One round's DP mechanism on this node: ``steps`` releases at ``sample_rate`` and ``noise``."""

    sample_rate: float
    steps: int
    noise: float
    expected_batch_size: int = 1


def plan_for(config: RunConfig, num_examples: int) -> Plan | None:
    """The mechanism of a round; the noise is solved for ``num-server-rounds`` such rounds."""
    if config.dp == "sample":
        batches_per_epoch = math.ceil(num_examples / config.batch_size)
        rate = 1.0 / batches_per_epoch  # opacus' DPDataLoader convention: expected batch = batch-size
        steps = config.local_steps or config.local_epochs * batches_per_epoch
        return Plan(rate, steps, noise_multiplier(config, rate, steps * config.num_server_rounds),
                    max(1, int(num_examples * rate)))
    if config.dp == "client-local":
        return Plan(1.0, 1, noise_multiplier(config, 1.0, config.num_server_rounds))
    return None


class ClientPrivacy:
    """This node's DP for one round; reads and writes its accountant in ``memory.extra``."""

    def __init__(self, config: RunConfig, memory: NodeMemory, num_examples: int):
        self.config = config
        self.memory = memory
        self.plan = plan_for(config, num_examples)
        self.budget = Budget.from_bytes(memory.extra.get(ACCOUNTANT), config.target_epsilon, config.delta)

    @property
    def exhausted(self) -> str:
        """Why this node must not train this round ("" when it may)."""
        plan = self.plan
        if plan is None or self.budget.allows(plan.noise, plan.sample_rate, plan.steps):
            return ""
        return (f"privacy budget exhausted: epsilon {self.budget.spent():.4g} spent at delta "
                f"{self.config.delta:g}; another round ({plan.steps} steps, noise multiplier "
                f"{plan.noise:.4g}) would exceed target-epsilon {self.config.target_epsilon:g}")

    def train(self, model: AdapterModel, data: Encoded,
              optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
        """DP-SGD (``dp=sample``) for this round's plan, recorded in the node's accountant.

        ``optimizer`` (default: a fresh one) is wrapped by opacus for the round; the state it
        keeps is computed from noised gradients only, so keeping it (``client-optimizer-state``)
        is post-processing and costs no privacy.
        """
        result = train_private(model, data, self.config, self.plan, self.budget, optimizer)
        self.memory.extra[ACCOUNTANT] = self.budget.to_bytes()
        return result

    def privatize(self, update: Tensors) -> Tensors:
        """With ``dp=client-local``: the update clipped to ``clip-norm`` plus N(0, (noise * clip-norm)^2)."""
        if self.config.dp != "client-local":
            return update
        noisy = add_noise(clip(update, self.config.clip_norm), self.plan.noise * self.config.clip_norm)
        self.budget.step(self.plan.noise, self.plan.sample_rate)
        self.memory.extra[ACCOUNTANT] = self.budget.to_bytes()
        return noisy

    def metrics(self) -> dict[str, float]:
        """Epsilon spent so far (left out when infinite: no noise; replies carry finite numbers only)."""
        if self.plan is None:
            return {}
        epsilon = self.budget.spent()
        return {**({"epsilon": epsilon} if math.isfinite(epsilon) else {}),
                "noise-multiplier": self.plan.noise, "dp-steps": self.budget.steps}


def train_private(model: AdapterModel, data: Encoded, config: RunConfig, plan: Plan,
                  budget: Budget, optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """``plan.steps`` DP-SGD steps on Poisson batches (opacus' sampler), in float32."""
    net = model.model
    net.train()
    sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=plan.sample_rate,
                                            generator=secret_generator(), steps=plan.steps)
    loss_sum, examples, start = 0.0, 0, time.perf_counter()
    with private_optimizer(model, optimizer or make_optimizer(model, config), noise=plan.noise,
                           max_grad_norm=config.max_grad_norm, expected_batch_size=plan.expected_batch_size,
                           budget=budget, sample_rate=plan.sample_rate) as optimizer:
        for indices in sampler:
            batch = collate([data.input_ids[i] for i in indices], [data.labels[i] for i in indices],
                            model.tokenizer.pad_token_id, model.device) if indices else None
            loss_sum += private_step(model, optimizer, batch) * len(indices)
            examples += len(indices)
    return TrainResult(loss=loss_sum / max(examples, 1), steps=plan.steps, examples=examples,
                       seconds=time.perf_counter() - start)


@contextmanager
def private_optimizer(model: AdapterModel, optimizer: torch.optim.Optimizer, *, noise: float,
                      max_grad_norm: float, expected_batch_size: int, budget: Budget | None = None,
                      sample_rate: float = 1.0) -> Iterator[DPOptimizer]:
    """``optimizer`` as an opacus DPOptimizer over per-sample gradients of the trainable tensors.

    Opacus' hooks are attached to the model itself (no GradSampleModule wrapper) and
    removed on exit, so the cached model is unchanged afterwards. Each step is recorded in
    ``budget`` at ``sample_rate``.
    """
    check_private(model.model)
    ModuleValidator.validate(model.model, strict=True)
    hooks = GradSampleHooks(model.model, batch_first=True, loss_reduction="mean")
    try:
        with warnings.catch_warnings():
            # the first LoRA layer's input needs no gradient; opacus only uses the output gradient there
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            dp = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean",
                             generator=secret_generator(model.device))
            if budget is not None:
                dp.attach_step_hook(budget.accountant.get_optimizer_hook_fn(sample_rate))
            yield dp
    finally:
        hooks.cleanup()


def private_step(model: AdapterModel, optimizer: DPOptimizer,
                 batch: dict[str, torch.Tensor] | None) -> float:
    """One DP-SGD step on ``batch`` (``None``: an empty Poisson batch, which is noise only)."""
    if batch is None:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        loss = 0.0
    else:
        losses = example_losses(model, batch)
        losses.mean().backward()
        loss = float(losses.detach().mean())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def example_losses(model: AdapterModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One loss per example, each depending on that example alone.

    Hugging Face's causal-LM loss averages over all tokens of the batch, which makes one
    example's gradient depend on the other examples' lengths; DP needs per-example terms.
    """
    logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if model.spec.task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return tokens.sum(1) / (labels != -100).sum(1).clamp(min=1)
