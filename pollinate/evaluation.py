"""Evaluate a model on tokenized data: accuracy and loss, or loss and perplexity.

Shared by the server (global model on the held-out split) and clients (local data),
so both report the same metric definitions. Causal LMs are scored on response tokens
only (prompt tokens carry no labels) with the chunked loss; held-out instruction rows
marked for generation (``eval-generate``) are also answered greedily and scored by
exact match and SQuAD-style token F1 against the reference answer.
"""

from __future__ import annotations

import contextlib
import math
import string
from collections import Counter

import torch
from transformers import GenerationConfig

from pollinate.data import Encoded, batches
from pollinate.instructions import InstructionData, end_token
from pollinate.losses import causal_lm_loss
from pollinate.modeling import AdapterModel

LOSS_CHUNK = 1024  # positions per chunk of the evaluation loss: bounds logits memory for any vocabulary


def evaluate(model: AdapterModel, data: Encoded, batch_size: int = 64) -> dict[str, float]:
    with _eager():
        return _scores(model, data, batch_size)


def _eager() -> contextlib.AbstractContextManager:
    """Run layers compiled for training (``compile``) eagerly: evaluation and generation
    shapes would only recompile them."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


@torch.no_grad()
def _scores(model: AdapterModel, data: Encoded, batch_size: int) -> dict[str, float]:
    net = model.model
    was_training = net.training
    net.eval()
    total_loss, total_items, correct = 0.0, 0, 0
    classification = model.spec.task == "classification"
    # length-sorted batches: metrics are order-free sums, and padding would cost ~25% more compute
    for batch in batches(data, batch_size, model.tokenizer.pad_token_id, shuffle=False,
                         device=model.device, bucket=True):
        if classification:
            out = net(**batch)
            loss, n = out.loss, batch["labels"].numel()
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:
            loss, n = causal_lm_loss(net, batch, LOSS_CHUNK)
        total_loss += float(loss) * n
        total_items += n
    loss = total_loss / max(total_items, 1)
    if classification:
        metrics = {"accuracy": correct / max(total_items, 1), "loss": loss}
    else:
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if isinstance(data, InstructionData) and data.generation_rows():
            metrics.update(generation_metrics(model, data, batch_size))
    net.train(was_training)
    return metrics


@torch.no_grad()
def generate(model: AdapterModel, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded batches), each cut at its end token."""
    tokenizer, net = model.tokenizer, model.model
    end, pad = end_token(tokenizer), tokenizer.pad_token_id
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end,
                                pad_token_id=pad)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        new = net.generate(input_ids=ids, attention_mask=mask, generation_config=settings)[:, width:]
        for row in new.tolist():
            out.append(row[:row.index(end)] if end in row else row)
    return out


def generation_metrics(model: AdapterModel, data: InstructionData, batch_size: int = 64) -> dict[str, float]:
    """Exact match and token F1 of greedy answers to the rows of ``data`` marked for generation."""
    rows = data.generation_rows()
    budget = max(data.generate[i] for i in rows)
    answers = generate(model, [data.prompts[i] for i in rows], budget, batch_size)
    tokenizer = model.tokenizer
    em = f1 = 0.0
    for i, answer in zip(rows, answers, strict=True):
        predicted = tokenizer.decode(answer[:data.generate[i]], skip_special_tokens=True)
        # the reference goes through the tokenizer too, so casing/spacing it cannot reproduce don't count
        reference = tokenizer.decode(tokenizer(data.references[i], add_special_tokens=False)["input_ids"])
        em += exact_match(predicted, reference)
        f1 += token_f1(predicted, reference)
    return {"exact_match": em / len(rows), "token_f1": f1 / len(rows)}


def normalize(text: str) -> list[str]:
    """Lower-cased words without punctuation (SQuAD's normalisation, articles kept)."""
    return text.lower().translate(str.maketrans("", "", string.punctuation)).split()


def exact_match(predicted: str, reference: str) -> float:
    return float(normalize(predicted) == normalize(reference))


def token_f1(predicted: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap), as in SQuAD."""
    pred, ref = normalize(predicted), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
