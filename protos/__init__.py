"""Protobuf schemas of the Pollinate wire format and their generated Python modules."""
