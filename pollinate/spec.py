"""What an adapter looks like on the wire: tensor names, shapes and dtypes.

The codec validates every decoded payload against an :class:`AdapterSpec`, so a peer
can never smuggle in an unknown tensor or a tensor of the wrong shape. LoRA ranks may
differ per client (heterogeneous ranks, FLoRA stacks), so an axis may be declared
*free* (``None``): any length from 1 up to ``max_free_dim`` is accepted there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

HEAD_MODULES = ("classifier", "score")
"""Modules whose tensors are the task head (trained whole, not through LoRA): the first part
of the tensor name (``classifier.weight``)."""
WIRE_HEADS = (*HEAD_MODULES, "gate")
"""What the codec sends with ``head-codec``: the task heads and an expert mixture's router
(``gate.*``), small tensors trained from scratch whose per-class (per-expert) rows carry
what the clients disagree on."""

Tensors = dict[str, torch.Tensor]


class SpecError(ValueError):
    """A tensor does not match the adapter spec (unknown name, wrong shape or dtype)."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape (``None`` marks a free axis, e.g. the LoRA rank) and dtype of one tensor."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype = torch.float32

    def accepts(self, shape: tuple[int, ...], max_free_dim: int) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(
            (want is None and 0 < got <= max_free_dim) or want == got
            for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class AdapterSpec(Mapping[str, TensorSpec]):
    """The named tensors a payload may carry; any subset of them may be present."""

    tensors: Mapping[str, TensorSpec]
    max_free_dim: int = 65536

    def __getitem__(self, name: str) -> TensorSpec:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], free_rank: bool = False,
           max_free_dim: int = 65536) -> AdapterSpec:
        """Spec of concrete tensors; ``free_rank`` frees the rank axis of LoRA factors."""
        return cls({n: TensorSpec(_shape(n, t, free_rank), t.dtype) for n, t in tensors.items()},
                   max_free_dim)

    def check(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
        """Raise :class:`SpecError` naming the problem if ``name``/``shape``/``dtype`` is not allowed."""
        if name not in self.tensors:
            raise SpecError(f"unknown tensor {name!r}")
        want = self.tensors[name]
        if not want.accepts(tuple(shape), self.max_free_dim):
            raise SpecError(f"tensor {name!r} has shape {tuple(shape)}, spec allows {want.shape}")
        if dtype is not None and dtype != want.dtype:
            raise SpecError(f"tensor {name!r} has dtype {dtype}, spec says {want.dtype}")

    def check_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.check(name, tuple(t.shape), t.dtype)


def is_lora_a(name: str) -> bool:
    return ".lora_A" in name or name.endswith("lora_A")


def is_lora_b(name: str) -> bool:
    return ".lora_B" in name or name.endswith("lora_B")


def _shape(name: str, t: torch.Tensor, free_rank: bool) -> tuple[int | None, ...]:
    shape: list[int | None] = list(t.shape)
    if free_rank and t.dim() == 2:
        if is_lora_a(name):
            shape[0] = None
        elif is_lora_b(name):
            shape[1] = None
    return tuple(shape)
