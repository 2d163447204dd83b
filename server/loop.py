"""The server's round loop: sample, send deltas, decode updates, aggregate, evaluate, checkpoint.

One :class:`Coordinator` per run. It owns the global versions and what each node
holds; the aggregator owns the math; the codec owns the bytes. A reply that cannot be
used (error, malformed, oversized, wrong shapes, NaN) is dropped for the round with
its reason logged and recorded; the round completes with the others and the global
state only ever changes through the aggregator's result.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from pollinate import data as datalib
from pollinate.aggregators import AggregationError, Aggregator, ClientUpdate, resolve
from pollinate.codec import CodecError, ErrorFeedback, decode
from pollinate.config import ConfigError, RunConfig
from pollinate.deltas import add
from pollinate.evaluation import evaluate
from pollinate.modeling import ModelSpec, pick_device
from pollinate.protocol import (
    EMPTY_VERSION,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    downlink_codec,
)

from .privacy import private_aggregator, round_privacy
from .progress import RoundDisplay
from .rundir import Checkpoint, RunDirectory
from .versions import FULL_ONLY, VersionStore

log = logging.getLogger("pollinate.server")
FIRST_VERSION = 1
# options that may change when a run is resumed; any other difference is a different run
RESUMABLE = {"num-server-rounds", "round-timeout", "resume", "out", "min-train-nodes",
             "fraction-train"}


@dataclass
class RoundLog:
    """What happened in one round, as written to metrics.jsonl."""

    round: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, node: int, reason: str) -> None:
        log.warning("round %d: dropped update of node %d: %s", self.round, node, reason)
        self.dropped.append({"node": node, "reason": reason})


class Coordinator:
    def __init__(self, config: RunConfig, grid: Grid, run_id: int = 0):
        self.config = config
        self.grid = grid
        self.run_id = run_id
        self.out = RunDirectory(config.out)
        self.test_table = datalib.test_table(config)
        self.num_labels = self._num_labels()
        spec = ModelSpec(name=config.model, task=config.task, num_labels=self.num_labels,
                         rank=config.global_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         target_modules=tuple(config.target_module_list), seed=config.seed)
        aggregator_cls = resolve(config.aggregator)
        self.model = aggregator_cls.build_model(spec, pick_device(config.device))
        self.test_data = datalib.encode(self.test_table, self.model.tokenizer, config.task,
                                        config.max_length)
        self.aggregator: Aggregator = private_aggregator(aggregator_cls(**config.aggregator_option_map),
                                                         config, self.model)  # DP wrapper/checks
        self.part = aggregator_cls.client_part(config.aggregator_option_map, {})
        self.initial_state = self.aggregator.initial_state(self.model)
        self.uplink_spec = self.aggregator.uplink_spec(self.model)
        self.downlink_spec = self.aggregator.downlink_spec(self.model)
        self.feedback = ErrorFeedback()
        self.versions = VersionStore(config.keep_versions + 1, run_id)
        self.node_versions: dict[int, int] = {}
        self.exhausted: set[int] = set()  # nodes that refused to train again (privacy budget spent)
        self.rounds: list[dict[str, Any]] = []
        self.start_round = self._restore_or_start()

    # -- setup ---------------------------------------------------------------------

    def _num_labels(self) -> int:
        if self.config.task != "classification":
            return 2
        if self.config.num_labels:
            return self.config.num_labels
        tables = [self.test_table]
        if not self.config.train_data or self.config.train_data != self.config.test_data:
            try:
                tables.append(datalib.train_table(self.config))
            except ConfigError:
                pass
        return datalib.num_labels(*tables)

    def _restore_or_start(self) -> int:
        ckpt = self.out.load_checkpoint() if self.config.resume else None
        if ckpt is None:
            self.out.metrics_file.unlink(missing_ok=True)
            self.versions.push(FIRST_VERSION, self.initial_state)
            self.rounds = [self._evaluate(0, {"bytes_up": 0, "bytes_down": 0, "clients": 0})]
            self.out.append_metrics(self.rounds[0])
            return 1
        self._check_resumable(ckpt.config)
        for version in sorted(ckpt.states):
            self.versions.push(version, ckpt.states[version], ckpt.increments.get(version))
        if ckpt.extra.get("run_id") == self.run_id:  # a node's memory (Context.state) lives
            self.node_versions = dict(ckpt.node_versions)  # in one run: a new run starts empty
        self.exhausted = set(ckpt.extra.get("exhausted", []))
        self.feedback = ErrorFeedback(ckpt.residual)
        self.out.truncate_metrics(ckpt.round)
        self.rounds = [r for r in self.out.read_metrics()]
        log.info("resuming from the checkpoint of round %d in %s", ckpt.round, self.out.path)
        return ckpt.round + 1

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = self.config.to_mapping()
        differ = sorted(k for k in set(now) | set(saved)
                        if k not in RESUMABLE and now.get(k) != saved.get(k))
        if differ:
            raise ConfigError(f"{self.out.path} holds a checkpoint of a different run "
                              f"(differs in {', '.join(differ)}); use another out or resume=false")

    # -- the loop ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        display = RoundDisplay(self.config.num_server_rounds, self.start_round - 1)
        with display:
            if self.start_round == 1:
                display.show(self.rounds[0])
            for rnd in range(self.start_round, self.config.num_server_rounds + 1):
                record = self.run_round(rnd)
                self.rounds.append(record)
                self.out.append_metrics(record)
                self._checkpoint(rnd)
                self.out.write_summary(self.summary())
                display.show(record)
        return self.finish()

    def run_round(self, rnd: int) -> dict[str, Any]:
        started = time.perf_counter()
        round_log = RoundLog(rnd)
        nodes = self._sample(rnd)
        messages = self._messages(rnd, nodes)
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout)
        # the grid sets message ids on push; an error reply the SuperLink writes for a node
        # that went offline comes from the SuperLink itself, so map replies by what they answer
        addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        self.aggregator.begin(rnd, self.versions.state)
        for reply in replies:
            self._receive(reply, addressee.get(reply.metadata.reply_to_message_id,
                                               reply.metadata.src_node_id), round_log)
        missing = set(nodes) - {c["node"] for c in round_log.clients} - {
            d["node"] for d in round_log.dropped}
        for node in sorted(missing):
            round_log.drop(node, "no reply before the round timeout")
        increment = self._advance(rnd) if any(c["used"] for c in round_log.clients) else 0
        traffic = {"bytes_up": sum(c["bytes_up"] for c in round_log.clients),
                   "bytes_down": sum(c["bytes_down"] for c in round_log.clients),
                   "bytes_increment": increment,
                   "clients": sum(c["used"] for c in round_log.clients)}
        record = self._evaluate(rnd, traffic)
        record.update(seconds=time.perf_counter() - started, client_metrics=round_log.clients,
                      dropped=round_log.dropped, aggregator=self.aggregator.metrics(),
                      version=self.versions.latest)
        record.update(_mean_client_metrics(round_log.clients))
        record.update(round_privacy(self.aggregator, round_log.clients))
        return record

    def _sample(self, rnd: int) -> list[int]:
        deadline = time.monotonic() + self.config.round_timeout
        need = max(self.config.min_train_nodes, 1)
        while True:
            nodes = sorted(set(self.grid.get_node_ids()) - self.exhausted)
            if len(nodes) >= need:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"round {rnd}: only {len(nodes)} nodes connected, "
                                   f"min-train-nodes is {need}")
            time.sleep(1.0)
        count = min(len(nodes), max(need, math.ceil(self.config.fraction_train * len(nodes))))
        return sorted(random.Random(self.config.seed * 7919 + rnd).sample(nodes, count))

    def _messages(self, rnd: int, nodes: list[int]) -> list[Message]:
        instructions = self.aggregator.instructions(rnd, nodes)
        self._sent: dict[int, tuple[int, str]] = {}
        messages = []
        for node in nodes:
            payload, kind = self.versions.payload_for(self.node_versions.get(node, EMPTY_VERSION), rnd)
            self._sent[node] = (len(payload), kind)
            order = TrainInstruction(rnd, self.config, self.num_labels, payload,
                                     instructions.get(node, {}))
            messages.append(Message(order.to_record(), dst_node_id=node,
                                    message_type=MessageType.TRAIN, group_id=str(rnd)))
        return messages

    def _receive(self, reply: Message, node: int, round_log: RoundLog) -> None:
        bytes_down, kind = self._sent.get(node, (0, "?"))
        if reply.has_error():
            round_log.drop(node, f"client error: {reply.error.reason}")
            return
        try:
            answer = TrainReply.from_message(reply)
        except (ProtocolError, ValueError, TypeError) as err:
            round_log.drop(node, f"malformed reply: {err}")
            return
        self.node_versions[node] = answer.held_version
        if answer.status == "stale" and answer.held_version == EMPTY_VERSION:
            self.node_versions[node] = FULL_ONLY  # cannot rebuild the seeded first version
        entry = {"node": node, "bytes_up": len(answer.payload), "bytes_down": bytes_down,
                 "downlink": kind, "status": answer.status, "num_examples": answer.num_examples,
                 "used": False, **answer.metrics, **answer.report}
        round_log.clients.append(entry)
        if answer.status == "exhausted":
            self.exhausted.add(node)
        if answer.status != "ok":
            round_log.drop(node, f"client {answer.status}: {answer.reason}")
            return
        try:
            delta = decode(answer.payload, self.uplink_spec,
                           max_payload_bytes=self.config.max_payload_bytes)
            update = ClientUpdate(node, delta.tensors, answer.num_examples,
                                  int(answer.metrics.get("rank", self.config.lora_rank)),
                                  float(answer.metrics.get("alpha", self.config.lora_alpha)),
                                  answer.metrics, answer.report)
            self.aggregator.check(update)
        except (CodecError, AggregationError) as err:
            round_log.drop(node, f"{type(err).__name__}: {err}")
            return
        self.aggregator.accumulate(update)
        entry["used"] = True

    def _advance(self, rnd: int) -> int:
        """Aggregate, compress the increment (with server-side error feedback), apply it."""
        delta = self.aggregator.finalize()
        wire = self.aggregator.pack_downlink(delta, latest_round=True)
        compensate = self.config.error_feedback and self.part.uses_error_feedback
        if compensate:
            wire = self.feedback.compensate(wire)
        payload = self.versions.encode_increment(wire, rnd, downlink_codec(self.config))
        sent = decode(payload, self.downlink_spec,
                      max_payload_bytes=self.config.max_payload_bytes)
        if compensate:
            self.feedback.update(wire, sent.tensors)
        state = add(self.versions.state, self.part.unpack_downlink(sent.tensors))
        self.versions.push(self.versions.latest + 1, state, payload)
        return len(payload)

    def _evaluate(self, rnd: int, traffic: dict[str, int]) -> dict[str, Any]:
        self.part.load_global(self.model, self.versions.state)
        metrics = evaluate(self.model, self.test_data)
        return {"round": rnd, **metrics, **traffic}

    def _checkpoint(self, rnd: int) -> None:
        self.out.save_checkpoint(Checkpoint(
            round=rnd, config=self.config.to_mapping(), states=self.versions.snapshot(),
            increments=dict(self.versions.increments), node_versions=self.node_versions,
            residual=self.feedback.residual,
            extra={"exhausted": sorted(self.exhausted), "run_id": self.run_id}))

    # -- results -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        keep = ("round", "accuracy", "loss", "perplexity", "bytes_up", "bytes_down", "clients",
                "seconds", "train_loss", "dropped", "epsilon")
        rounds = [{k: r[k] for k in keep if k in r} for r in self.rounds]
        return {"config": self.config.to_mapping(), "num_labels": self.num_labels,
                "rounds": rounds, "final": rounds[-1] if rounds else {},
                "exhausted_clients": sorted(self.exhausted)}

    def finish(self) -> dict[str, Any]:
        from .plots import plot_rounds

        self.part.load_global(self.model, self.versions.state)
        self.model.export(self.out.path / "adapter", self.model.adapter_state())
        summary = self.summary()
        pngs = plot_rounds(summary["rounds"], self.out.path)
        pngs += self.aggregator.plots(self.rounds, self.out.path)
        summary["plots"] = [p.name for p in pngs]
        self.out.write_summary(summary)
        return summary


def _mean_client_metrics(clients: list[dict[str, Any]]) -> dict[str, float]:
    used = [c for c in clients if c["used"]]
    total = sum(c["num_examples"] for c in used)
    if not total:
        return {}
    return {"train_loss": sum(c.get("train-loss", 0.0) * c["num_examples"] for c in used) / total}
