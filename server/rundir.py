"""The run directory: metrics.jsonl, summary.json, plots, checkpoints and the exported adapter.

Everything a person or a later process needs to inspect or resume a run lives here.
Checkpoints are written atomically (temp dir, then rename) every round so that a
server killed at any moment resumes from the last completed round.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from pollinate.config import ConfigError
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
    optimizer: Tensors = field(default_factory=dict)  # the server optimizer's state_dict


RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint", "checkpoint.old", "checkpoint.tmp", "adapter")


def fresh_path(root: str | Path = "runs", tag: str = "") -> Path:
    """``runs/<date>-<time>[-tag]``: a new directory per run, so no run overwrites another by default."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else "")
    path, n = Path(root) / stamp, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` holds (part of) an earlier run."""
    return any((Path(path) / name).exists() for name in RUN_FILES)


def check_reuse(path: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to write into an earlier run's directory unless told to resume or overwrite it."""
    if holds_run(path) and not (resume or overwrite):
        raise ConfigError(f"out {path} holds an earlier run; pass --resume (resume=true) to continue it, "
                          "--overwrite (overwrite=true) to replace it, or choose another --out")


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"out {self.path}: cannot write there ({err.strerror})") from err

    def clear(self) -> None:
        """Remove an earlier run's files (``overwrite``); its log and other files stay."""
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for png in self.path.glob("*.png"):
            png.unlink()

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
        save_file({k: v.contiguous() for k, v in ckpt.optimizer.items()}, str(tmp / "optimizer.safetensors"))
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
            extra=meta.get("extra", {}), optimizer=_load_if_there(directory / "optimizer.safetensors"))

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metrics of rounds after ``last_round`` (written before a crash, not checkpointed)."""
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        _atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))


def _load_if_there(path: Path) -> Tensors:
    """The tensors of ``path``; none for a checkpoint written before the file existed."""
    return load_file(str(path)) if path.exists() else {}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
