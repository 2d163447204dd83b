"""The committed protobuf modules must be exactly what protoc makes of delta.proto."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pollinate.protos.generate import PROTO_FILES, PROTO_ROOT, generate

GENERATED = [PROTO_ROOT / p.replace(".proto", s)
             for p in PROTO_FILES for s in ("_pb2.py", "_pb2.pyi")]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools is not installed, so the protobuf code cannot be "
                           "regenerated (pip install -e '.[dev]')")
def test_committed_code_matches_a_fresh_protoc_run(tmp_path: Path):
    fresh = generate(tmp_path)
    assert [p.relative_to(tmp_path) for p in fresh] == [p.relative_to(PROTO_ROOT)
                                                         for p in GENERATED]
    for new, committed in zip(fresh, GENERATED, strict=True):
        assert new.read_bytes() == committed.read_bytes(), (
            f"{committed} is out of date with its .proto: run python -m pollinate.protos.generate")


@pytest.mark.parametrize("path", [p for p in GENERATED if p.suffix == ".py"], ids=str)
def test_generated_code_imports_only_the_protobuf_runtime(path: Path):
    # No cross-file imports: the modules must work under any package path
    # (pollinate.protos.pollinate.v1), which protoc's absolute imports would break.
    imports = re.findall(r"^(?:from|import) (\S+)", path.read_text(), flags=re.M)
    assert imports and all(m.startswith("google.protobuf") for m in imports), imports


def test_generated_module_is_importable_from_the_package():
    from pollinate.protos.pollinate.v1 import delta_pb2

    assert delta_pb2.DESCRIPTOR.package == "pollinate.v1"
    assert {"AdapterDelta", "TensorEntry"} <= set(delta_pb2.DESCRIPTOR.message_types_by_name)
