"""Arithmetic on named-tensor dicts: a state plus a delta, and the delta between states.

A name missing on one side counts as zeros there, so partial updates (selected
layers, a subset of experts) compose without special cases.
"""

from __future__ import annotations

import hashlib

import torch

from pollinate.spec import Tensors


def add(state: Tensors, delta: Tensors) -> Tensors:
    """``state + delta``; a name only in ``delta`` is added to zero."""
    out = dict(state)
    for name, value in delta.items():
        out[name] = out[name] + value if name in out else value.clone()
    return out


def diff(new: Tensors, old: Tensors) -> Tensors:
    """``new - old`` over the names of ``new`` (a name absent from ``old`` counts as zero)."""
    return {n: (t - old[n]) if n in old else t.clone() for n, t in new.items()}


def digest(state: Tensors) -> bytes:
    """SHA-256 over names, shapes and float32 bytes: equal digests mean bitwise-equal states."""
    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode() + b"\0")
        h.update(tensor.numpy().tobytes())
    return h.digest()
