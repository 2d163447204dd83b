"""Protobuf package ``pollinate.v1``: version 1 of the wire format."""
