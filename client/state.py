"""What a client remembers between rounds: in Flower's node state, or in a node-state directory.

The held global version and its tensors (so the server can send only a delta from
it), the uplink error-feedback residual and small blobs such as the DP accountant,
serialised as one safetensors blob. By default the blob lives in the node's
``Context.state``. Flower's simulation engine keeps every node's Context in the main
process, so with many virtual clients that memory grows with every node ever sampled
(about two adapters each); with ``node-state-dir`` set the blob goes to
``<dir>/<node-id>.safetensors`` (written atomically) and the Context holds only its
path, so a node's memory is on disk while it is not in the round. Either way the
memory is the node's and lives for one run: a Context that points at nothing starts
empty, whatever files an earlier run left. Node state never leaves the node.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load, save

from pollinate.protocol import EMPTY_VERSION
from pollinate.spec import Tensors

KEY = "pollinate"
_VERSION, _HELD, _RESIDUAL, _EXTRA = "held-version", "held", "residual", "extra"  # tensor names: kind/key


class NodeStateError(RuntimeError):
    """The node-state file this node's Context points at is missing or unreadable."""


@dataclass
class NodeMemory:
    held_version: int = EMPTY_VERSION
    held_state: Tensors = field(default_factory=dict)
    residual: Tensors = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, state: RecordDict) -> NodeMemory:
        """The memory ``store`` left in this Context (or in the file it points at); empty if none."""
        if KEY not in state:
            return cls()
        record = state[KEY]
        if "file" not in record:
            return cls.from_bytes(bytes(record["memory"]))
        path = Path(str(record["file"]))
        try:
            return cls.from_bytes(path.read_bytes())
        except (OSError, SafetensorError) as err:  # an accountant must never silently restart from zero
            raise NodeStateError(f"node state {path} cannot be read ({err}); this node cannot "
                                 "continue the run") from err

    def store(self, state: RecordDict, directory: str = "", node_id: int = 0) -> None:
        """Keep this memory in ``state``, or in ``directory`` with only its path in ``state``."""
        blob = self.to_bytes()
        if not directory:
            state[KEY] = ConfigRecord({"memory": blob})
            return
        path = Path(directory) / f"{node_id}.safetensors"
        write_atomic(path, blob)
        state[KEY] = ConfigRecord({"file": str(path.resolve())})

    def to_bytes(self) -> bytes:
        tensors = {_VERSION: torch.tensor([self.held_version], dtype=torch.int64),
                   **{f"{_HELD}/{k}": v for k, v in self.held_state.items()},
                   **{f"{_RESIDUAL}/{k}": v for k, v in self.residual.items()},
                   **{f"{_EXTRA}/{k}": torch.frombuffer(bytearray(v), dtype=torch.uint8) if v
                      else torch.zeros(0, dtype=torch.uint8) for k, v in self.extra.items()}}
        return save({k: v.contiguous() for k, v in tensors.items()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> NodeMemory:
        tensors = load(blob)
        memory = cls(int(tensors.pop(_VERSION)))
        for name, value in tensors.items():
            kind, _, key = name.partition("/")
            if kind == _HELD:
                memory.held_state[key] = value
            elif kind == _RESIDUAL:
                memory.residual[key] = value
            else:
                memory.extra[key] = value.numpy().tobytes()
        return memory


def write_atomic(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` through a temporary file and a rename: never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
