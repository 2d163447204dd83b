"""Protobuf package ``pollinate`` (mirrors the proto package name)."""
