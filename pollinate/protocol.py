"""What the server and clients say to each other inside Flower messages.

Server and client never import each other; both build and read messages through
this module. Adapter tensors only ever travel as the codec's opaque payload bytes
(``downlink`` / ``uplink`` records); everything else is small config and metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from pollinate.codec import CodecSpec
from pollinate.config import RunConfig
from pollinate.spec import WIRE_HEADS

CONFIG, DOWNLINK, UPLINK, METRICS, REPORT = "config", "downlink", "uplink", "metrics", "report"
PAYLOAD = "payload"
EMPTY_VERSION = 0  # a client holding nothing; global versions start at 1


class ProtocolError(ValueError):
    """A message lacks a record or field this protocol requires, or a field is out of its schema.

    ``field`` names what failed (``num-examples``, ``status``, ...), so the server can log
    a named reason for every reply it drops.
    """

    def __init__(self, message: str, field: str = "record"):
        super().__init__(message)
        self.field = field


@dataclass
class TrainInstruction:
    """Server -> client: the round, the run config, per-client instructions, the downlink."""

    round: int
    config: RunConfig
    num_labels: int
    payload: bytes
    instructions: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()  # the run's label names (id order); empty for integer labels

    def to_record(self) -> RecordDict:
        return RecordDict({
            CONFIG: ConfigRecord({
                "round": self.round,
                "run-config": self.config.to_json(),
                "num-labels": self.num_labels,
                "labels": json.dumps(list(self.labels)),
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
                   instructions=json.loads(_field(cfg, "instructions")),
                   labels=tuple(json.loads(cfg.get("labels", "[]"))))


STATUSES = ("ok", "stale", "exhausted")
# the closed schema of a reply: its records, their fields, and bounds on everything free-form
REPLY_RECORDS = {UPLINK: {PAYLOAD}, METRICS: None, REPORT: {"status", "reason", "report"}}
MAX_ENTRIES = 256  # metrics, and report entries (expert routing reports two per expert)
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 4096  # the reason, and each string in the report
MAX_REPORT_CHARS = 64 * 1024
MAX_COUNT = 2**53  # num-examples and held-version are integers a float64 holds exactly


@dataclass
class TrainReply:
    """Client -> server: the encoded update plus example count, metrics and a status.

    :meth:`from_message` is the only way the server reads a reply, and it accepts only
    this closed schema: the three records and their fields, a known status, finite
    numeric metrics, integer counts, a report that is a small flat dict of scalars.
    Anything else raises :class:`ProtocolError` naming the field. Bounds that depend on
    the run (example cap, existing versions, the header the server sent) are the
    server's to check (``pollinate.server.replies``).
    """

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
        extra = sorted(set(content.keys()) - set(REPLY_RECORDS))
        if extra:
            raise ProtocolError(f"unexpected records {extra}")
        up, met, rep = _record(content, UPLINK), _record(content, METRICS), _record(content, REPORT)
        for key, record, kind in ((UPLINK, up, ConfigRecord), (METRICS, met, MetricRecord),
                                  (REPORT, rep, ConfigRecord)):
            if not isinstance(record, kind):
                raise ProtocolError(f"{key!r} is a {type(record).__name__}, not a {kind.__name__}")
            unknown = sorted(set(record.keys()) - (REPLY_RECORDS[key] or set(record.keys())))
            if unknown:
                raise ProtocolError(f"{key!r} has unexpected fields {unknown}")
        payload = _field(up, PAYLOAD)
        if not isinstance(payload, bytes):
            raise ProtocolError(f"payload is a {type(payload).__name__}, not bytes", "payload")
        metrics = dict(met.items())
        num_examples = _count(metrics.pop("num-examples", None), "num-examples")
        held_version = _count(metrics.pop("held-version", None), "held-version")
        metrics = _scalars(metrics, "metrics", strings=False)
        status = _text(_field(rep, "status"), "status")
        if status not in STATUSES:
            raise ProtocolError(f"status {status[:64]!r} is not one of {STATUSES}", "status")
        raw = _text(_field(rep, "report"), "report", MAX_REPORT_CHARS)
        try:
            report = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as err:
            raise ProtocolError(f"report is not JSON: {err}", "report") from err
        if not isinstance(report, dict):
            raise ProtocolError(f"report is a JSON {type(report).__name__}, not an object", "report")
        return cls(status=status, payload=payload,
                   num_examples=num_examples, held_version=held_version,
                   metrics=metrics, report=_scalars(report, "report", strings=True),
                   reason=_text(rep.get("reason", ""), "reason"))


def _text(value: Any, name: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} is a {type(value).__name__}, not a string", name)
    if len(value) > limit:
        raise ProtocolError(f"{name} has {len(value)} characters, at most {limit} allowed", name)
    return value


def _scalars(values: dict[Any, Any], name: str, *, strings: bool) -> dict[str, Any]:
    """``values`` if it is a small flat dict of finite numbers (and short strings if ``strings``)."""
    if len(values) > MAX_ENTRIES:
        raise ProtocolError(f"{name} has {len(values)} entries, at most {MAX_ENTRIES} allowed", name)
    for key, value in values.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_CHARS:
            raise ProtocolError(f"{name} key {str(key)[:MAX_KEY_CHARS]!r} is not a string of at most "
                                f"{MAX_KEY_CHARS} characters", name)
        if strings and isinstance(value, str):
            _text(value, name)
        elif isinstance(value, bool) and strings:
            continue
        elif not _finite(value):
            raise ProtocolError(f"{name} {key!r} is {str(value)[:64]}, not a finite number", name)
    return dict(values)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any, name: str) -> int:
    """A required integer field of the metrics record (an integral float is accepted)."""
    if value is None:
        raise ProtocolError(f"metrics lack {name!r}", name)
    if not _finite(value) or float(value) != int(value) or abs(value) > MAX_COUNT:
        raise ProtocolError(f"{name} is {str(value)[:64]}, not an integer of at most {MAX_COUNT}", name)
    return int(value)


def _record(content: RecordDict, key: str) -> Any:
    if key not in content:
        raise ProtocolError(f"message has no {key!r} record")
    return content[key]


def _field(record: Any, key: str) -> Any:
    if key not in record:
        raise ProtocolError(f"record lacks field {key!r}")
    return record[key]


def uplink_codec(config: RunConfig) -> CodecSpec:
    """How clients compress their updates (``codec``, ``density``, ``head-codec``)."""
    return CodecSpec(encoding=config.codec, density=config.density, head_encoding=config.head_codec,
                     head_modules=WIRE_HEADS, max_payload_bytes=config.max_payload_bytes)


def downlink_codec(config: RunConfig) -> CodecSpec:
    """How the server compresses each round's global increment (``downlink-codec``, ``head-codec``)."""
    return CodecSpec(encoding=config.downlink_codec, density=config.downlink_density,
                     head_encoding=config.head_codec, head_modules=WIRE_HEADS,
                     max_payload_bytes=config.max_payload_bytes)


LOSSLESS = CodecSpec(encoding="fp32")
"""Catch-up and full-state downlinks must be exact: they are sent losslessly."""
