"""The last N global versions, and the downlink payload that takes a client to the newest.

A client that held the previous version gets the round's (lossy, error-compensated)
increment, encoded once and shared. A client a few versions behind gets the exact
difference, losslessly. A new client gets the exact difference from the first version,
the seeded initial adapter it can rebuild itself, with that version's digest so it can
check; a client that cannot rebuild it, or one further behind than the window, gets the
full state as a delta from nothing. Every version's state is exactly what clients
reconstruct, because the server applies the same decoded increment it sends.
"""

from __future__ import annotations

from collections import OrderedDict

from pollinate.codec import CodecSpec, Delta, DeltaHeader, encode
from pollinate.deltas import diff, digest
from pollinate.protocol import EMPTY_VERSION, LOSSLESS
from pollinate.spec import Tensors

FULL_ONLY = -1
"""Server-side marker: the node holds nothing and cannot rebuild the first version."""


class VersionStore:
    def __init__(self, keep: int, run_id: int = 0):
        if keep < 1:
            raise ValueError(f"keep-versions must be >= 1, got {keep}")
        self.keep = keep
        self.run_id = run_id
        self.states: OrderedDict[int, Tensors] = OrderedDict()
        self.increments: dict[int, bytes] = {}
        self.anchor: tuple[int, Tensors, bytes] | None = None  # first version, never evicted
        self._cache: dict[tuple[int, bytes], bytes] = {}

    @property
    def latest(self) -> int:
        return next(reversed(self.states)) if self.states else EMPTY_VERSION

    @property
    def state(self) -> Tensors:
        return self.states[self.latest]

    def push(self, version: int, state: Tensors, increment: bytes | None = None) -> None:
        """Record ``state`` as ``version``; ``increment`` is the payload from ``version - 1``."""
        self.states[version] = state
        if self.anchor is None:
            self.anchor = (version, state, digest(state))
        if increment is not None:
            self.increments[version] = increment
        while len(self.states) > self.keep:
            old, _ = self.states.popitem(last=False)
            self.increments.pop(old, None)
        self._cache.clear()

    def payload_for(self, held: int, rnd: int) -> tuple[bytes, str]:
        """The downlink for a client holding ``held`` and what kind of delta it is."""
        latest = self.latest
        base_digest = b""
        if held == latest:
            kind = "current"
        elif held == latest - 1 and latest in self.increments:
            return self.increments[latest], "increment"
        elif held in self.states or (self.anchor and held == self.anchor[0]):
            kind = "catch-up"
        elif held == EMPTY_VERSION and self.anchor is not None:
            kind, (held, _, base_digest) = "seeded", self.anchor
        else:
            kind, held = "full", EMPTY_VERSION
        key = (held, base_digest)
        if key not in self._cache:
            base = self.states.get(held) or (self.anchor[1] if self.anchor and held == self.anchor[0] else {})
            delta = {} if held == latest else diff(self.state, base)
            header = DeltaHeader(self.run_id, rnd, held, latest, base_digest)
            self._cache[key] = encode(Delta(header, delta), LOSSLESS)
        return self._cache[key], kind

    def snapshot(self) -> dict[int, Tensors]:
        """The kept versions plus the first one: what a checkpoint must hold."""
        first = {self.anchor[0]: self.anchor[1]} if self.anchor else {}
        return {**first, **self.states}

    def encode_increment(self, delta: Tensors, rnd: int, spec: CodecSpec) -> bytes:
        header = DeltaHeader(self.run_id, rnd, self.latest, self.latest + 1)
        return encode(Delta(header, delta), spec)
