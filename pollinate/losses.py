"""The causal-LM loss without full fp32 logits: chunked cross-entropy over labelled tokens.

A Llama-3 vocabulary has 128,256 entries: a batch of 16 x 512 tokens has 8,192 positions,
so the model's own loss materialises 2 GiB of bf16 logits, then a 4 GiB fp32 copy, and
keeps them for backward. Here the logits of only the labelled positions (prompt tokens
are masked in instruction tuning) are computed ``chunk`` positions at a time, upcast to
fp32 for the cross-entropy, and recomputed in backward instead of kept
(``torch.utils.checkpoint``), so at most one chunk's logits exist at any moment. The
value and gradient are those of the plain mean cross-entropy (``tests/test_llm_clients.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Sum of the cross-entropies of ``head(hidden[i])`` against ``targets[i]`` (``hidden``: [N, H])."""
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, h, head.weight, head.bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, head.weight, head.bias, t)
    return total


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32
    return F.cross_entropy(logits, targets, reduction="sum")


def chunkable(model: nn.Module) -> bool:
    """Whether ``model`` (a peft or plain HF causal LM) maps hidden states to logits by one Linear."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return (type(base.get_output_embeddings()) is nn.Linear and hasattr(base, "get_decoder")
            and not any(getattr(config, name, None) for name in _LOGIT_POSTPROCESSING))


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   chunk: int) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled tokens, and their count.

    ``chunk`` > 0 and a model whose head is one Linear: the chunked loss above, run on
    the decoder's last hidden states; otherwise the model's own forward and loss.
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    count = int(keep.sum())
    if chunk <= 0 or not chunkable(model):
        return model(**batch).loss, count
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state
    total = chunked_cross_entropy(hidden[:, :-1][keep], base.get_output_embeddings(), labels[keep], chunk)
    return total / max(count, 1), count
