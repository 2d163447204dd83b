"""Local training of the trainable adapter tensors: AdamW, epochs or steps, clipping, autocast,
and FedRS's restricted softmax under label skew (:func:`restricted_softmax`).

The round's learning rate follows ``lr-schedule`` and ``lr-warmup-rounds``
(:func:`round_learning_rate`); with ``client-optimizer-state`` the optimizer's state
outlives the round as bytes in the node's memory (:func:`optimizer_state`).

One trainer for CPU and GPU; what differs (device, precision) is chosen from the config.
Batches are length-bucketed and dynamically padded, so no compute goes to padding (on
AG News with ``max-length`` 64 that is about a quarter of it). ``auto`` stays fp32 on
CPUs: bf16 autocast made a MiniLM training step slower on the AMX CPU it was measured on.
Causal LMs train on the chunked loss of :mod:`pollinate.losses` (no full fp32 logits),
with gradient checkpointing and compiled decoder layers when the config asks for them
(``docs/llm.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from pollinate.config import RunConfig
from pollinate.data import Encoded, batches
from pollinate.losses import causal_lm_loss
from pollinate.modeling import AdapterModel, compile_layers, set_gradient_checkpointing
from pollinate.spec import HEAD_MODULES


@dataclass
class TrainResult:
    loss: float
    steps: int
    examples: int
    seconds: float
    tokens: int = 0  # non-padding tokens trained on


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``auto`` means bf16 on a GPU that supports it, full precision elsewhere."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


SGD_MOMENTUM = 0.9


def make_optimizer(model: AdapterModel, config: RunConfig) -> torch.optim.Optimizer:
    """A fresh optimizer of the trainable tensors for one round (``optimizer``: adamw or sgd).

    AdamW is the default. SGD with momentum is there for DP-SGD: a round is a few steps
    from a fresh state, and Adam's first steps move every coordinate by about the learning
    rate whatever its gradient, so coordinates where the DP noise dominates get full-size
    random steps; SGD moves each coordinate in proportion to its (noisy) gradient.
    """
    params = [p for p in model.model.parameters() if p.requires_grad]
    fused = model.device.type == "cuda"
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=SGD_MOMENTUM)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, fused=fused or None)


COSINE_FLOOR = 0.1
"""Share of ``learning-rate`` the cosine schedule ends at: a last round at rate 0 would cost a
round of compute and change nothing."""


def round_learning_rate(config: RunConfig, rnd: int) -> float:
    """The local learning rate of round ``rnd`` (from 1): ``learning-rate`` x warm-up x decay.

    Warm-up: round ``r`` of the first ``W`` = ``lr-warmup-rounds`` trains at ``r / W`` of it.
    ``lr-schedule=cosine``: from round ``W + 1`` (the full rate) half a cosine down to
    :data:`COSINE_FLOOR` of it at round ``num-server-rounds``. Every node computes it from
    the round number and the config the server sends, so all agree without more state.
    """
    warmup = config.lr_warmup_rounds
    factor = min(1.0, rnd / warmup) if warmup else 1.0
    if config.lr_schedule == "cosine" and rnd > warmup:
        progress = min((rnd - warmup - 1) / max(config.num_server_rounds - warmup - 1, 1), 1.0)
        factor = COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate * factor


def optimizer_state(optimizer: torch.optim.Optimizer, model: AdapterModel, previous: bytes | None) -> bytes:
    """The optimizer's per-tensor state as safetensors bytes, keyed ``<slot>/<adapter tensor name>``.

    Tensors that did not train this round (frozen by the method) keep their entries from
    ``previous``, so a block trained every other round resumes its own moments.
    """
    names = {id(model.parameter(n)): n for n in model.adapter_names}
    kept = dict(load(previous)) if previous else {}
    for param, state in optimizer.state.items():
        name = names.get(id(param))  # every trainable tensor is an adapter tensor; guard anyway
        for slot, value in state.items():
            if name is not None and torch.is_tensor(value):
                kept[f"{slot}/{name}"] = value.detach().to("cpu").contiguous()
    return save(kept)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: AdapterModel, blob: bytes | None) -> None:
    """Give ``optimizer`` (fresh, over this round's trainable tensors) the state saved by
    :func:`optimizer_state`; learning rates stay this round's. A tensor without saved state,
    or whose shape changed, starts fresh."""
    if not blob:
        return
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load(blob).items():
        slot, _, name = key.partition("/")
        saved.setdefault(name, {})[slot] = value
    names = {id(model.parameter(n)): n for n in model.adapter_names}
    for group in optimizer.param_groups:
        on_device = bool(group.get("fused") or group.get("capturable"))  # else torch keeps "step" on the CPU
        for param in group["params"]:
            state = saved.get(names.get(id(param), ""))
            if state is None or any(v.shape != param.shape for k, v in state.items() if v.dim()):
                continue
            optimizer.state[param] = {k: v.to(param.device if v.dim() or on_device else "cpu")
                                      for k, v in state.items()}


def optimizer_steps(blob: bytes) -> int:
    """The largest per-tensor step count in a saved optimizer state (0 without one)."""
    steps = [int(v) for k, v in load(blob).items() if k.startswith("step/")] if blob else []
    return max(steps, default=0)


@contextmanager
def restricted_softmax(net: torch.nn.Module, data: Encoded, alpha: float) -> Iterator[None]:
    """FedRS's restricted softmax (Li & Zhan, KDD 2021) while training: the logits of classes
    absent from ``data`` are scaled by ``alpha`` (``restricted-softmax``; 1 = unchanged).

    Under label skew a client's cross-entropy pushes every absent class's head row away from
    its features, and AdamW makes those pushes full-size however small their gradients are;
    averaged over clients, most of a class's row updates then come from clients that never
    saw it. At ``alpha`` 0 an absent class gets no gradient at all. A forward hook on each
    task head scales its output, so each model computes its own loss (an expert mixture
    keeps its routing loss).
    """
    if alpha >= 1.0:
        yield
        return
    present = sorted(set(data.labels))
    factors: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # built once per head shape

    def scale(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        key = (logits.shape[-1], logits.dtype, logits.device)
        if key not in factors:
            factors[key] = torch.full(key[:1], alpha, dtype=logits.dtype, device=logits.device)
            factors[key][present] = 1.0
        return logits * factors[key]

    hooks = [m.register_forward_hook(scale) for name, m in net.named_modules()
             if name.split(".")[-1] in HEAD_MODULES]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def train(model: AdapterModel, data: Encoded, config: RunConfig, seed: int,
          optimizer: torch.optim.Optimizer | None = None) -> TrainResult:
    """Train for ``local-steps`` steps if set, else ``local-epochs`` epochs over ``data``."""
    net = model.model
    net.train()
    set_gradient_checkpointing(net, config.gradient_checkpointing)
    if config.compile:
        compile_layers(net)
    causal = config.task == "causal-lm"
    optimizer = optimizer or make_optimizer(model, config)
    dtype = autocast_dtype(config.precision, model.device)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    params = [p for p in net.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = config.local_steps or config.local_epochs * steps_per_epoch
    step, loss_sum, examples, tokens, start = 0, 0.0, 0, 0, time.perf_counter()
    epoch = 0
    with restricted_softmax(net, data, config.absent_class_scale):
        while step < total_steps:
            for batch in batches(data, config.batch_size, model.tokenizer.pad_token_id, shuffle=True,
                                 seed=seed + epoch, device=model.device, bucket=True):
                with torch.autocast(model.device.type, dtype=dtype or torch.float32,
                                    enabled=dtype is not None):
                    loss = (causal_lm_loss(net, batch, config.loss_chunk_size)[0] if causal
                            else net(**batch).loss)
                scaler.scale(loss).backward()
                if config.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach())
                examples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
                step += 1
                if step >= total_steps:
                    break
            epoch += 1
    return TrainResult(loss=loss_sum / max(step, 1), steps=step, examples=examples,
                       seconds=time.perf_counter() - start, tokens=tokens)
