"""Evaluate a model on tokenized data: accuracy and loss, or loss and perplexity.

Shared by the server (global model on the held-out split) and clients (local data),
so both report the same metric definitions.
"""

from __future__ import annotations

import math

import torch

from pollinate.data import Encoded, batches
from pollinate.modeling import AdapterModel


@torch.no_grad()
def evaluate(model: AdapterModel, data: Encoded, batch_size: int = 64) -> dict[str, float]:
    net = model.model
    was_training = net.training
    net.eval()
    total_loss, total_items, correct = 0.0, 0, 0
    classification = model.spec.task == "classification"
    # length-sorted batches: metrics are order-free sums, and padding would cost ~25% more compute
    for batch in batches(data, batch_size, model.tokenizer.pad_token_id, shuffle=False,
                         device=model.device, bucket=True):
        out = net(**batch)
        if classification:
            n = batch["labels"].numel()
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * n
        total_items += n
    net.train(was_training)
    loss = total_loss / max(total_items, 1)
    if classification:
        return {"accuracy": correct / max(total_items, 1), "loss": loss}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
