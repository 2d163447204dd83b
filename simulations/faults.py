"""Faulty and hostile clients for simulated federations: how a run copes with bad peers.

``faulty_client_app({0: "garbage"})`` is the real Pollinate ClientApp, except that the
listed partitions misbehave after training: the real ``handle_train`` runs, then its
reply is tampered with at the Flower message level. Faults are a malfunction (random
bytes, an oversized payload, a reply without its update record, a crash) or an attack
(:data:`ATTACKS`: a claimed example count of inf, keys that collide with the server's
bookkeeping, a replayed or foreign payload, ...). A partition may get one fault for
the whole run or a sequence, one per round (the last one repeats), so one federation
can try many attacks. Robustness tests use it to show that one bad client never stops
a round or changes what the honest clients make of the global state.

Each faulty client writes ``<out>/faults/<partition-id>`` holding its node id, so a
test can tell which node of metrics.jsonl played which fault.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from pollinate.codec import frame
from pollinate.protocol import METRICS, PAYLOAD, REPORT, UPLINK, TrainInstruction
from pollinate.protos.pollinate.v1 import delta_pb2 as pb

MALFUNCTIONS = ("garbage", "oversize", "malformed", "crash")
REPLAY_KEY = "faults-replay"  # node state: the previous round's payload, kept by "replay"


class InjectedFault(RuntimeError):
    """Raised by a client configured to crash."""


def _set_metric(key: str, value: float) -> Callable[[Message, TrainInstruction], None]:
    def tamper(reply: Message, order: TrainInstruction) -> None:
        metrics = dict(reply.content[METRICS].items())
        reply.content[METRICS] = MetricRecord({**metrics, key: value})
    return tamper


def _set_report(key: str, value: str) -> Callable[[Message, TrainInstruction], None]:
    def tamper(reply: Message, order: TrainInstruction) -> None:
        reply.content[REPORT][key] = value
    return tamper


def _edit_payload(edit: Callable[[pb.AdapterDelta], None]) -> Callable[[Message, TrainInstruction], None]:
    """Re-encode the payload's message after ``edit`` (entry checksums recomputed)."""
    def tamper(reply: Message, order: TrainInstruction) -> None:
        limit = order.config.max_payload_bytes
        message = pb.AdapterDelta.FromString(frame.unwrap(reply.content[UPLINK][PAYLOAD], limit))
        edit(message)
        for entry in message.tensors:
            entry.crc32 = frame.entry_checksum(entry)
        reply.content[UPLINK][PAYLOAD] = frame.wrap(message.SerializeToString(), 3)
    return tamper


def _amplify(message: pb.AdapterDelta) -> None:
    """Scale every quantised tensor by 1000: a well-formed update, far too large."""
    for entry in message.tensors:
        entry.scales[:] = [1000.0 * scale for scale in entry.scales]


def _metric_collides(reply: Message, order: TrainInstruction) -> None:
    _set_metric("used", 1.0)(reply, order)


def _report_collides(reply: Message, order: TrainInstruction) -> None:
    report = json.loads(reply.content[REPORT]["report"])
    reply.content[REPORT]["report"] = json.dumps({**report, "node": 7, "num_examples": 10**6})


def _rank_mismatch(reply: Message, order: TrainInstruction) -> None:
    _set_metric("rank", 2 * reply.content[METRICS]["rank"])(reply, order)


def _empty_payload(reply: Message, order: TrainInstruction) -> None:
    reply.content[UPLINK][PAYLOAD] = b""


ATTACKS: dict[str, Callable[[Message, TrainInstruction], None]] = {
    "examples-inf": _set_metric("num-examples", math.inf),
    "examples-nan": _set_metric("num-examples", math.nan),
    "examples-huge": _set_metric("num-examples", 1e30),
    "examples-negative": _set_metric("num-examples", -7),
    "examples-zero": _set_metric("num-examples", 0),
    "metric-collides": _metric_collides,
    "report-collides": _report_collides,
    "rank-zero": _set_metric("rank", 0),
    "rank-mismatch": _rank_mismatch,
    "alpha-inf": _set_metric("alpha", math.inf),
    "held-negative": _set_metric("held-version", -1),
    "held-future": _set_metric("held-version", 2**62),
    "status-unknown": _set_report("status", "excellent"),
    "report-not-dict": _set_report("report", json.dumps([1, 2, 3])),
    "payload-empty": _empty_payload,
    "foreign-run": _edit_payload(lambda message: setattr(message, "run_id", message.run_id + 1)),
    "wrong-base": _edit_payload(lambda message: setattr(message, "base_version", message.base_version + 1)),
    "amplify": _edit_payload(_amplify),
}
"""Tampering with a real reply after training; ``replay`` (below) needs the node's state."""
FAULTS = (*MALFUNCTIONS, *ATTACKS, "replay")


def faulty_client_app(faults: dict[int, str | Sequence[str]]) -> ClientApp:
    """The Pollinate ClientApp with ``faults[partition_id]`` applied to those partitions.

    A sequence gives the fault of each round in turn (the last repeats). ``replay`` sends
    the payload this node computed in the previous round, whatever it sent then (and
    crashes when there is none yet).
    """
    plans = {pid: (fault,) if isinstance(fault, str) else tuple(fault) for pid, fault in faults.items()}
    unknown = sorted({f for plan in plans.values() for f in plan} - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {FAULTS}")
    from pollinate.client.app import handle_train

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config.get("partition-id", -1))
        if pid not in plans:
            return handle_train(msg, context)
        order = TrainInstruction.from_message(msg)
        _record_node(order, pid, context.node_id)
        fault = plans[pid][min(order.round, len(plans[pid])) - 1]
        if fault == "crash":
            raise InjectedFault("client configured to crash")
        reply = handle_train(msg, context)
        previous = context.state.get(REPLAY_KEY)  # kept whatever the fault, for a later replay
        context.state[REPLAY_KEY] = ConfigRecord({PAYLOAD: reply.content[UPLINK][PAYLOAD]})
        if fault == "replay":
            if previous is None:
                raise InjectedFault("nothing to replay in the first round")
            reply.content[UPLINK][PAYLOAD] = previous[PAYLOAD]
        elif fault == "garbage":
            rng = random.Random(len(reply.content[UPLINK][PAYLOAD]))
            reply.content[UPLINK][PAYLOAD] = rng.randbytes(2048)
        elif fault == "oversize":
            reply.content[UPLINK][PAYLOAD] = b"PLN1" + bytes(order.config.max_payload_bytes)
        elif fault == "malformed":
            del reply.content[UPLINK]
        else:
            ATTACKS[fault](reply, order)
        return reply

    return app


def _record_node(order: TrainInstruction, partition_id: int, node_id: int) -> None:
    directory = Path(order.config.out) / "faults"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(partition_id)).write_text(str(node_id))


def fault_nodes(out: str | Path) -> dict[int, int]:
    """Partition id -> node id of the faulty clients of the run in ``out``."""
    directory = Path(out) / "faults"
    return {int(p.name): int(p.read_text()) for p in directory.iterdir()} if directory.exists() else {}
