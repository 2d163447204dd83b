"""The wire as the server sees it: only codec payloads travel, bad peers are dropped, catch-up is exact."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from pollinate.codec import CodecSpec, decode
from pollinate.config import RunConfig
from pollinate.deltas import add, digest
from pollinate.protocol import DOWNLINK, EMPTY_VERSION, PAYLOAD, UPLINK
from pollinate.server.loop import Coordinator
from pollinate.server.rundir import RunDirectory
from pollinate.server.versions import FULL_ONLY, VersionStore
from pollinate.simulations.launch import simulate
from pollinate.spec import AdapterSpec

SMALL = dict(num_clients=3, num_server_rounds=2, max_train_examples=80, test_examples=100,
             resume=False)


class RecordingGrid(Grid):
    """A Grid that forwards to Flower's and keeps every message that crossed it."""

    def __init__(self, inner: Grid, sink: list[Message]):
        self.inner, self.sink = inner, sink

    def set_run(self, run):  # noqa: ANN001 - Flower's signature
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.sink.extend(messages + replies)
        return replies


def test_only_codec_payloads_travel_and_bytes_are_counted(tmp_path, monkeypatch):
    config = RunConfig(**SMALL, out=str(tmp_path))
    sink: list[Message] = []
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:  # noqa: ANN001
        Coordinator(config, RecordingGrid(grid, sink), run_id=context.run_id).run()

    import pollinate.server.app as server_app

    monkeypatch.setattr(server_app, "make_app", lambda _config: app)
    simulate(config)
    assert len(sink) == 2 * 3 * 2  # 3 instructions + 3 replies per round
    payload_bytes = {"up": 0, "down": 0}
    for message in sink:
        for record in message.content.values():
            assert not isinstance(record, ArrayRecord), "adapter tensors must only travel encoded"
            assert isinstance(record, (ConfigRecord, MetricRecord))
            for value in record.values():
                if isinstance(value, bytes):
                    assert value[:4] == b"PLN1" or value == b""
        if DOWNLINK in message.content:
            payload_bytes["down"] += len(message.content[DOWNLINK][PAYLOAD])
        if UPLINK in message.content:
            payload_bytes["up"] += len(message.content[UPLINK][PAYLOAD])
    rounds = RunDirectory(tmp_path).read_metrics()[1:]
    assert sum(r["bytes_up"] for r in rounds) == payload_bytes["up"]
    assert sum(r["bytes_down"] for r in rounds) == payload_bytes["down"]


def test_bad_clients_are_dropped_and_global_equals_honest_only(tmp_path):
    """Garbage, a reply without its update and an oversized payload: each dropped with its reason.

    The global versions must be bitwise those of a run in which the same clients sent nothing.
    """
    sizes = {**SMALL, "num_clients": 5, "max_payload_bytes": 4 * 1024 * 1024}
    bad = RunConfig(**sizes, out=str(tmp_path / "bad"))
    absent = RunConfig(**sizes, out=str(tmp_path / "absent"))
    bad_summary = simulate(bad, faults={0: "garbage", 1: "malformed", 2: "oversize"})
    simulate(absent, faults={0: "crash", 1: "crash", 2: "crash"})
    assert [r["round"] for r in bad_summary["rounds"]] == [0, 1, 2]
    metrics = RunDirectory(bad.out).read_metrics()
    for record in metrics[1:]:
        assert record["clients"] == 2
        reasons = " | ".join(d["reason"] for d in record["dropped"])
        for needle in ("BadMagic", "malformed reply", "PayloadTooLarge"):
            assert needle in reasons
    got = RunDirectory(bad.out).load_checkpoint().states
    want = RunDirectory(absent.out).load_checkpoint().states
    assert got.keys() == want.keys()
    for version in got:
        for name in want[version]:
            assert torch.equal(got[version][name], want[version][name]), (version, name)


def test_client_that_skips_rounds_catches_up_exactly():
    """A client's held state + the catch-up payload equals the server's newest version."""
    torch.manual_seed(0)
    state = {"a.lora_A.weight": torch.randn(4, 16), "head.weight": torch.randn(3, 16)}
    spec = AdapterSpec.of(state, free_rank=True)
    store = VersionStore(keep=4)
    store.push(1, state)
    client_held = {1: state}
    for rnd in range(1, 7):  # six rounds of lossy increments
        increment = {n: 0.01 * torch.randn_like(t) for n, t in state.items()}
        payload = store.encode_increment(increment, rnd, CodecSpec("topk-ternary", density=0.2))
        applied = decode(payload, spec).tensors
        store.push(store.latest + 1, add(store.state, applied), payload)
        # a client that took part in every round stays exactly in sync with increments alone
        client_held[store.latest] = add(client_held[store.latest - 1],
                                        decode(store.payload_for(store.latest - 1, rnd)[0], spec).tensors)
        for name in state:
            assert torch.equal(client_held[store.latest][name], store.state[name])
    for held in (5, 4):  # skipped one or two rounds: an exact catch-up inside the window
        payload, kind = store.payload_for(held, 7)
        delta = decode(payload, spec)
        assert kind == "catch-up" and delta.header.base_version == held
        caught_up = add(client_held[held], delta.tensors)
        for name in state:
            torch.testing.assert_close(caught_up[name], store.state[name], rtol=0, atol=1e-6)
    payload, kind = store.payload_for(2, 7)  # fell out of the window: the full state, from nothing
    delta = decode(payload, spec)
    assert kind == "full" and delta.header.base_version == 0
    for name in state:
        assert torch.equal(delta.tensors[name], store.state[name])
    assert store.payload_for(FULL_ONLY, 7)[1] == "full"
    payload, kind = store.payload_for(EMPTY_VERSION, 7)  # new: from the seeded first version
    delta = decode(payload, spec)
    assert kind == "seeded" and delta.header.base_version == 1
    assert delta.header.base_digest == digest(state)
    for name in state:
        torch.testing.assert_close(add(state, delta.tensors)[name], store.state[name], rtol=0, atol=1e-6)
