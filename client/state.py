"""What a client remembers between rounds, in Flower's persistent node state.

The held global version and its tensors (so the server can send only a delta from
it) and the uplink error-feedback residual. Stored as safetensors bytes in a
ConfigRecord: node state never leaves the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict
from safetensors.torch import load, save

from pollinate.protocol import EMPTY_VERSION
from pollinate.spec import Tensors

KEY = "pollinate"


@dataclass
class NodeMemory:
    held_version: int = EMPTY_VERSION
    held_state: Tensors = field(default_factory=dict)
    residual: Tensors = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, state: RecordDict) -> NodeMemory:
        if KEY not in state:
            return cls()
        rec = state[KEY]
        extra = {k.removeprefix("extra:"): bytes(v) for k, v in rec.items() if k.startswith("extra:")}
        return cls(int(rec["held-version"]), _tensors(rec["held-state"]), _tensors(rec["residual"]),
                   extra)

    def store(self, state: RecordDict) -> None:
        record = ConfigRecord({
            "held-version": self.held_version,
            "held-state": save({k: v.contiguous() for k, v in self.held_state.items()}),
            "residual": save({k: v.contiguous() for k, v in self.residual.items()}),
        })
        for key, value in self.extra.items():
            record[f"extra:{key}"] = value
        state[KEY] = record


def _tensors(blob: bytes) -> Tensors:
    return dict(load(bytes(blob))) if blob else {}
