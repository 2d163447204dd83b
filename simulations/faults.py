"""Faulty clients for simulated federations: how a run copes with bad peers.

``faulty_client_app({0: "garbage"})`` is the real Pollinate ClientApp, except that the
listed partitions misbehave after training: they send random bytes, an oversized
payload, a reply without its update record, or they crash. Robustness tests and
demos use it to show that one bad client never stops a round or corrupts the global
state.
"""

from __future__ import annotations

import random

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pollinate.protocol import PAYLOAD, UPLINK, TrainInstruction

FAULTS = ("garbage", "oversize", "malformed", "crash")


class InjectedFault(RuntimeError):
    """Raised by a client configured to crash."""


def faulty_client_app(faults: dict[int, str]) -> ClientApp:
    """The Pollinate ClientApp with ``faults[partition_id]`` applied to those partitions."""
    unknown = sorted(set(faults.values()) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {FAULTS}")
    from pollinate.client.app import handle_train

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault = faults.get(int(context.node_config.get("partition-id", -1)))
        if fault == "crash":
            raise InjectedFault("client configured to crash")
        reply = handle_train(msg, context)
        if fault == "garbage":
            rng = random.Random(len(reply.content[UPLINK][PAYLOAD]))
            reply.content[UPLINK][PAYLOAD] = rng.randbytes(2048)
        elif fault == "oversize":
            limit = TrainInstruction.from_message(msg).config.max_payload_bytes
            reply.content[UPLINK][PAYLOAD] = b"PLN1" + bytes(limit)
        elif fault == "malformed":
            del reply.content[UPLINK]
        return reply

    return app
