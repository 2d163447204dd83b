"""Label-free gate start: nearest-centroid routing of public texts' common-expert embeddings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from pollinate.aggregators.expert_routing.layers import GATE_LOGIT_SCALE, GATE_OUT_GAIN
from pollinate.aggregators.expert_routing.mixture import MixtureModel
from pollinate.config import ConfigError
from pollinate.data import Encoded
from pollinate.spec import Tensors

CENTROID_SHARPNESS = 4.0  # k-means gate: tanh(s * cosine) on the expert's hidden unit


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: float sums then round the same way in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def spherical_kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 25) -> torch.Tensor:
    """``k`` unit-norm centroids of unit-norm ``points`` (k-means++ seeding, cosine distance)."""
    if len(points) < k:
        raise ConfigError(f"expert-routing: k-means needs at least {k} texts, got {len(points)}")
    gen = torch.Generator().manual_seed(seed)
    centroids = [points[int(torch.randint(len(points), (1,), generator=gen))]]
    for _ in range(1, k):
        distance = (1 - points @ torch.stack(centroids).T).min(-1).values.clamp_min(1e-12)
        centroids.append(points[int(torch.multinomial(distance, 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign = (points @ c.T).argmax(-1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                c[j] = F.normalize(members.mean(0), dim=0)
    return c


def kmeans_gate_state(model: MixtureModel, texts: Sequence[str], max_length: int = 64) -> Tensors:
    """Gate tensors that route like nearest-centroid k-means of the common expert's embeddings.

    Embeddings are centred on their mean ``m``; expert e owns hidden unit e,
    ``h_e = tanh(s c_e . (x - m))``, and ``logit_e = gain * h_e``. The other hidden units
    keep their random initialisation and start with zero output weights.
    """
    ids = model.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    with single_thread():  # clients rebuild this state and the server checks its digest
        points = model.embeddings(Encoded(ids, [0] * len(ids)), memo=False)
        center = points.mean(0)
        centroids = spherical_kmeans(F.normalize(points - center, dim=-1), model.num_experts,
                                     model.config.seed)
    experts, hidden = model.num_experts, model.config.gate_hidden
    if hidden < experts:
        raise ConfigError(f"expert-routing: start=kmeans needs gate-hidden >= experts "
                          f"({hidden} < {experts})")
    state = {n: model.parameter(n).detach().cpu().clone() for n in model.gate_names()}
    scale = CENTROID_SHARPNESS / float((points - center).norm(dim=-1).mean())
    state["gate.hidden.weight"][:experts] = scale * centroids
    state["gate.hidden.bias"][:experts] = -scale * centroids @ center
    out = torch.zeros(experts, hidden)
    out[:, :experts] = torch.eye(experts) * GATE_OUT_GAIN / GATE_LOGIT_SCALE
    state["gate.out.weight"], state["gate.out.bias"] = out, torch.zeros(experts)
    return state


def public_texts(path: str) -> list[str]:
    """The ``text`` column of an unlabelled CSV/JSONL (the k-means start's public data)."""
    from datasets import Dataset

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"expert-routing: kmeans-data file not found: {path}")
    table = Dataset.from_csv(str(file)) if file.suffix == ".csv" else Dataset.from_json(str(file))
    if "text" not in table.column_names:
        raise ConfigError(f"expert-routing: kmeans-data {path} has no 'text' column "
                          f"(has {table.column_names})")
    return [str(t) for t in table["text"]]
