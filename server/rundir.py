"""The run directory: metrics.jsonl, summary.json, plots, checkpoints and the exported adapter.

Everything a person or a later process needs to inspect or resume a run lives here.
Checkpoints are written atomically (temp dir, then rename) every round so that a
server killed at any moment resumes from the last completed round.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pollinate.spec import Tensors


@dataclass
class Checkpoint:
    """Everything the server needs to continue after a restart."""

    round: int
    config: dict[str, Any]
    states: dict[int, Tensors]
    increments: dict[int, bytes]
    node_versions: dict[int, int]
    residual: Tensors = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2))

    # -- checkpoints -------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        tmp = self.path / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for version, state in ckpt.states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"v{version}.safetensors"))
        for version, payload in ckpt.increments.items():
            (tmp / f"inc{version}.bin").write_bytes(payload)
        save_file({k: v.contiguous() for k, v in ckpt.residual.items()}, str(tmp / "residual.safetensors"))
        meta = {"round": ckpt.round, "config": ckpt.config, "versions": sorted(ckpt.states),
                "increments": sorted(ckpt.increments),
                "node_versions": {str(k): v for k, v in ckpt.node_versions.items()},
                "extra": ckpt.extra}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = self.path / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint_dir.exists():
            os.replace(self.checkpoint_dir, old)
        os.replace(tmp, self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> Checkpoint | None:
        directory = self.checkpoint_dir
        if not (directory / "meta.json").exists():
            old = self.path / "checkpoint.old"  # killed between the two renames
            directory = old if (old / "meta.json").exists() else None
        if directory is None:
            return None
        meta = json.loads((directory / "meta.json").read_text())
        return Checkpoint(
            round=meta["round"], config=meta["config"],
            states={v: load_file(str(directory / f"v{v}.safetensors")) for v in meta["versions"]},
            increments={v: (directory / f"inc{v}.bin").read_bytes() for v in meta["increments"]},
            node_versions={int(k): v for k, v in meta["node_versions"].items()},
            residual=load_file(str(directory / "residual.safetensors")),
            extra=meta.get("extra", {}))

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics of rounds after ``last_round`` (written before a crash, not checkpointed)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        _atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
