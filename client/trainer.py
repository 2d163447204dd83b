"""Local training of the trainable adapter tensors: AdamW, epochs or steps, clipping, autocast.

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
from dataclasses import dataclass

import torch

from pollinate.config import RunConfig
from pollinate.data import Encoded, batches
from pollinate.losses import causal_lm_loss
from pollinate.modeling import AdapterModel, compile_layers, set_gradient_checkpointing


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
