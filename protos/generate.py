"""Regenerate the Python protobuf modules from ``protos/pollinate/v1/*.proto``.

The generated ``*_pb2.py``/``*_pb2.pyi`` files are committed so that installing Pollinate
does not need grpcio-tools; ``tests/test_proto_drift.py`` calls :func:`generate` into a
temporary folder and compares the result with the committed files byte for byte.

Run ``python -m pollinate.protos.generate`` to rewrite the committed files in place.
"""

from __future__ import annotations

from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("pollinate/v1/delta.proto",)


def generate(out_dir: str | Path) -> list[Path]:
    """Run protoc on :data:`PROTO_FILES`, writing ``.py`` and ``.pyi`` under ``out_dir``.

    Returns the paths of the generated files. Raises ``RuntimeError`` if protoc fails and
    ``ImportError`` if grpcio-tools is not installed.
    """
    from grpc_tools import protoc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--pyi_out={out}",
            *PROTO_FILES]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / p.replace(".proto", suffix)
            for p in PROTO_FILES for suffix in ("_pb2.py", "_pb2.pyi")]


if __name__ == "__main__":
    for path in generate(PROTO_ROOT):
        print(path)
