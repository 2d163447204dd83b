"""What the server and clients say to each other inside Flower messages.

Server and client never import each other; both build and read messages through
this module. Adapter tensors only ever travel as the codec's opaque payload bytes
(``downlink`` / ``uplink`` records); everything else is small config and metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from pollinate.codec import CodecSpec
from pollinate.config import RunConfig

CONFIG, DOWNLINK, UPLINK, METRICS, REPORT = "config", "downlink", "uplink", "metrics", "report"
PAYLOAD = "payload"
EMPTY_VERSION = 0  # a client holding nothing; global versions start at 1


class ProtocolError(ValueError):
    """A message lacks a record or field this protocol requires."""


@dataclass
class TrainInstruction:
    """Server -> client: the round, the run config, per-client instructions, the downlink."""

    round: int
    config: RunConfig
    num_labels: int
    payload: bytes
    instructions: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> RecordDict:
        return RecordDict({
            CONFIG: ConfigRecord({
                "round": self.round,
                "run-config": self.config.to_json(),
                "num-labels": self.num_labels,
                "instructions": json.dumps(self.instructions),
            }),
            DOWNLINK: ConfigRecord({PAYLOAD: self.payload}),
        })

    @classmethod
    def from_message(cls, message: Message) -> TrainInstruction:
        content = message.content
        cfg, down = _record(content, CONFIG), _record(content, DOWNLINK)
        return cls(round=int(_field(cfg, "round")), config=RunConfig.from_json(_field(cfg, "run-config")),
                   num_labels=int(_field(cfg, "num-labels")), payload=bytes(_field(down, PAYLOAD)),
                   instructions=json.loads(_field(cfg, "instructions")))


@dataclass
class TrainReply:
    """Client -> server: the encoded update plus example count, metrics and a status."""

    status: str  # "ok", "stale" (cannot apply the downlink) or "exhausted" (privacy budget spent)
    payload: bytes
    num_examples: int
    held_version: int
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def to_record(self) -> RecordDict:
        metrics = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}
        metrics.update({"num-examples": self.num_examples, "held-version": self.held_version})
        return RecordDict({
            UPLINK: ConfigRecord({PAYLOAD: self.payload}),
            METRICS: MetricRecord(metrics),
            REPORT: ConfigRecord({"status": self.status, "reason": self.reason,
                                  "report": json.dumps(self.report)}),
        })

    @classmethod
    def from_message(cls, message: Message) -> TrainReply:
        content = message.content
        up, met, rep = _record(content, UPLINK), _record(content, METRICS), _record(content, REPORT)
        metrics = {k: float(v) for k, v in met.items() if isinstance(v, (int, float))}
        try:
            report = json.loads(str(_field(rep, "report")))
        except json.JSONDecodeError as err:
            raise ProtocolError(f"report is not JSON: {err}") from err
        return cls(status=str(_field(rep, "status")), payload=bytes(_field(up, PAYLOAD)),
                   num_examples=int(metrics.pop("num-examples", 0)),
                   held_version=int(metrics.pop("held-version", EMPTY_VERSION)),
                   metrics=metrics, report=report if isinstance(report, dict) else {},
                   reason=str(rep.get("reason", "")))


def _record(content: RecordDict, key: str) -> Any:
    if key not in content:
        raise ProtocolError(f"message has no {key!r} record")
    return content[key]


def _field(record: Any, key: str) -> Any:
    if key not in record:
        raise ProtocolError(f"record lacks field {key!r}")
    return record[key]


def uplink_codec(config: RunConfig) -> CodecSpec:
    """How clients compress their updates (``codec``, ``density``)."""
    return CodecSpec(encoding=config.codec, density=config.density,
                     max_payload_bytes=config.max_payload_bytes)


def downlink_codec(config: RunConfig) -> CodecSpec:
    """How the server compresses each round's global increment (``downlink-codec``)."""
    return CodecSpec(encoding=config.downlink_codec, density=config.downlink_density,
                     max_payload_bytes=config.max_payload_bytes)


LOSSLESS = CodecSpec(encoding="fp32")
"""Catch-up and full-state downlinks must be exact: they are sent losslessly."""
