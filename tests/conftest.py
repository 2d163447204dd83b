"""Shared fixtures: paths to the real datasets and small run configurations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "ag_news" / "train.csv").exists():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA
