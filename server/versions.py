"""The last N global versions, and the downlink payload that takes a client to the newest.

A client that held the previous version gets the round's (lossy, error-compensated)
increment, encoded once and shared. A client a few versions behind gets the exact
difference, losslessly; a new client, or one further behind than the window, gets the
full state as a delta from nothing. Every version's state is exactly what clients
reconstruct, because the server applies the same decoded increment it sends.
"""

from __future__ import annotations

from collections import OrderedDict

from pollinate.codec import CodecSpec, Delta, DeltaHeader, encode
from pollinate.deltas import diff
from pollinate.protocol import EMPTY_VERSION, LOSSLESS
from pollinate.spec import Tensors


class VersionStore:
    def __init__(self, keep: int, run_id: int = 0):
        if keep < 1:
            raise ValueError(f"keep-versions must be >= 1, got {keep}")
        self.keep = keep
        self.run_id = run_id
        self.states: OrderedDict[int, Tensors] = OrderedDict()
        self.increments: dict[int, bytes] = {}
        self._cache: dict[int, bytes] = {}

    @property
    def latest(self) -> int:
        return next(reversed(self.states)) if self.states else EMPTY_VERSION

    @property
    def state(self) -> Tensors:
        return self.states[self.latest]

    def push(self, version: int, state: Tensors, increment: bytes | None = None) -> None:
        """Record ``state`` as ``version``; ``increment`` is the payload from ``version - 1``."""
        self.states[version] = state
        if increment is not None:
            self.increments[version] = increment
        while len(self.states) > self.keep:
            old, _ = self.states.popitem(last=False)
            self.increments.pop(old, None)
        self._cache.clear()

    def payload_for(self, held: int, rnd: int) -> tuple[bytes, str]:
        """The downlink for a client holding ``held`` and what kind of delta it is."""
        latest = self.latest
        if held == latest:
            kind = "current"
        elif held == latest - 1 and latest in self.increments:
            return self.increments[latest], "increment"
        elif held in self.states:
            kind = "catch-up"
        else:
            kind, held = "full", EMPTY_VERSION
        if held not in self._cache:
            base = self.states.get(held, {})
            delta = {} if held == latest else diff(self.state, base)
            header = DeltaHeader(self.run_id, rnd, held, latest)
            self._cache[held] = encode(Delta(header, delta), LOSSLESS)
        return self._cache[held], kind

    def encode_increment(self, delta: Tensors, rnd: int, spec: CodecSpec) -> bytes:
        header = DeltaHeader(self.run_id, rnd, self.latest, self.latest + 1)
        return encode(Delta(header, delta), spec)
