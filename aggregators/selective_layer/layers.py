"""Layer groups and their importance: which transformer block each LoRA tensor belongs to.

A *layer* is one transformer block: every LoRA module whose canonical name contains
``encoder.layer.{i}.`` (BERT family) or ``layers.{i}.`` (Llama family) belongs to block
``i``. The classification head is always trained; LoRA on embeddings is refused (the
method has no rule for it), and so is LoRA on any other module outside a block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from pollinate.config import ConfigError
from pollinate.modeling import AdapterModel

_BLOCK = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")


def block_of(name: str) -> int | None:
    """Index of the transformer block a canonical tensor name belongs to, or ``None``."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def transformer_layers(model: AdapterModel) -> dict[int, list[str]]:
    """``block -> adapter tensor names`` of every LoRA module; refuses LoRA outside blocks."""
    heads = set(model.head_names())
    layers: dict[int, list[str]] = {}
    for name in model.adapter_names:
        if name in heads:
            continue
        block = block_of(name)
        if block is None:
            kind = "embeddings" if "embed" in name else "a module outside the transformer blocks"
            raise ConfigError(
                f"selective-layer: adapter tensor {name!r} is LoRA on {kind}; layers are transformer "
                "blocks (encoder.layer.{i} / layers.{i}) and embeddings are never trained: "
                "restrict target-modules to modules inside the blocks")
        layers.setdefault(block, []).append(name)
    if not layers:
        raise ConfigError("selective-layer: the model has no LoRA modules inside transformer blocks")
    return dict(sorted(layers.items()))



def layer_importance(model: AdapterModel, layers: Mapping[int, Sequence[str]],
                     probe: Sequence[Mapping[str, torch.Tensor]]) -> dict[int, float]:
    """Squared norm of each layer's LoRA gradient, averaged over the ``probe`` batches.

    Forward and backward in eval mode (no dropout, so the score is a function of the
    model and the batches), the gradients of ``lora_A``/``lora_B`` read per block and
    then cleared so that training starts from clean ``.grad`` fields.
    """
    names = [n for block in layers.values() for n in block]
    model.set_trainable(set(names))
    params = [model.parameter(n) for n in names]
    net = model.model
    was_training = net.training
    net.eval()
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            for batch in probe:
                (net(**batch).loss / len(probe)).backward()
        scores = {block: sum(float(model.parameter(n).grad.detach().float().pow(2).sum())
                             for n in block_names if model.parameter(n).grad is not None)
                  for block, block_names in layers.items()}
    finally:
        for p in params:
            p.grad = None
        net.train(was_training)
    return scores
