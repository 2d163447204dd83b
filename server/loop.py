"""The server's round loop: sample, send deltas, decode updates, aggregate, evaluate, checkpoint.

One :class:`Coordinator` per run. It owns the global versions and what each node
holds; the aggregator owns the math; the codec owns the bytes. Every reply is checked in
full first (``replies.py``); one that cannot be used (error, malformed, out of bounds,
foreign or replayed, wrong shapes, NaN) is dropped for the round with its reason logged
and recorded; the round completes with the others and the global state only ever
changes through the aggregator's result.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from datasets import Dataset
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from pollinate import data as datalib
from pollinate import partitions
from pollinate.aggregators import AggregationError, Aggregator, resolve
from pollinate.codec import ErrorFeedback, decode, encode_with_feedback
from pollinate.config import ConfigError, RunConfig
from pollinate.deltas import add
from pollinate.evaluation import evaluate
from pollinate.modeling import ModelSpec, pick_device
from pollinate.privacy import l2_norm
from pollinate.protocol import EMPTY_VERSION, TrainInstruction, TrainReply, downlink_codec

from .curves import cumulative, to_target
from .optimizers import server_optimizer
from .privacy import CentralDP, privacy_state, private_aggregator, restore_privacy, round_privacy
from .profile import RoundClock
from .progress import RoundDisplay
from .replies import Rejected, ReplyChecker, Sent, norm_outliers, order_key
from .rundir import Checkpoint, RunDirectory, check_reuse
from .versions import FULL_ONLY, VersionStore

log = logging.getLogger("pollinate.server")
FIRST_VERSION = 1
# options that may change when a run is resumed; any other difference is a different run
RESUMABLE = {"num-server-rounds", "round-timeout", "resume", "out", "min-train-nodes", "target-accuracy",
             "fraction-train", "node-state-dir", "ray-address"}


@dataclass
class RoundLog:
    """What happened in one round, as written to metrics.jsonl."""

    round: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    # checked updates not yet aggregated: (order key, node, reply, norm); not written out
    pending: list[tuple[bytes, int, TrainReply, float]] = field(default_factory=list, repr=False)

    def drop(self, node: int, reason: str, check: str = "") -> None:
        """Record that ``node``'s reply is not used this round; ``check`` names the failed check."""
        log.warning("round %d: dropped update of node %d: %s", self.round, node, reason)
        self.dropped.append({"node": node, "reason": reason, **({"check": check} if check else {})})


class Coordinator:
    def __init__(self, config: RunConfig, grid: Grid, run_id: int = 0):
        aggregator_cls = resolve(config.aggregator)
        config = aggregator_cls.settle_config(config, log.warning)
        self.config = config
        self.grid = grid
        self.run_id = run_id
        check_reuse(config.out, resume=config.resume, overwrite=config.overwrite)
        self.out = RunDirectory(config.out)
        if config.overwrite:
            self.out.clear()
        self.partition: dict[str, Any] | None = None  # the simulated clients' split, when checked
        self.labels, self.num_labels, self.test_table = self._labels_and_test_table()
        spec = ModelSpec.from_config(config, self.num_labels, config.global_rank, full_precision=True)
        aggregator_cls = resolve(config.aggregator)
        self.model = aggregator_cls.build_model(spec, pick_device(config.device))
        self.test_data = None if self.test_table is None else datalib.encode(
            self.test_table, self.model.tokenizer, config.task, config.max_length)
        self.aggregator: Aggregator = private_aggregator(aggregator_cls(**config.aggregator_option_map),
                                                         config, self.model)  # DP wrapper/checks
        self.part = aggregator_cls.client_part(config.aggregator_option_map, {})
        self.initial_state = self.aggregator.initial_state(self.model)
        self.uplink_spec = self.aggregator.uplink_spec(self.model)
        self.downlink_spec = self.aggregator.downlink_spec(self.model)
        self.feedback = ErrorFeedback()
        self.optimizer = server_optimizer(config)  # steps on each round's global delta
        self.versions = VersionStore(config.keep_versions + 1, run_id)
        self.node_versions: dict[int, int] = {}
        self.exhausted: set[int] = set()  # nodes that refused to train again (privacy budget spent)
        self.rounds: list[dict[str, Any]] = []
        self.start_round = self._restore_or_start()

    # -- setup ---------------------------------------------------------------------

    def _labels_and_test_table(self) -> tuple[tuple[str, ...], int, Dataset | None]:
        """The run's label names, label count and the server's held-out table.

        Names come from the training file (the label map every client reads its data
        through), else from the test file. A server with neither file and ``num-labels``
        set (a deployment whose data lives on the nodes) evaluates nothing; with
        neither and no ``num-labels`` the run is the generated demo task.
        """
        config = self.config
        if config.task != "classification":
            return (), 2, datalib.test_table(config)
        if not (config.train_data or config.test_data) and config.num_labels:
            log.warning("no train-data or test-data on the server: rounds are not evaluated")
            return (), config.num_labels, None
        train = datalib.train_table(config) if config.train_data else None  # read once
        self._check_split(train if train is not None else datalib.train_table(config))
        names = datalib.label_names(train) if train is not None else ()
        test = datalib.test_table(config, names if train is not None else None)
        names = names or datalib.label_names(test)
        count = len(names) if names else config.num_labels or datalib.num_labels(
            test, *([train] if train is not None else []))
        if names and config.num_labels and config.num_labels != len(names):
            raise ConfigError(f"num-labels={config.num_labels} but the data has {len(names)} labels")
        return names, count, test

    def _check_split(self, train: Dataset) -> None:
        """Split the training table as simulated clients will, before round 1: a split that
        cannot work fails here rather than in every client, and a repaired one is said once."""
        split = partitions.split(self.config, train, self.config.num_clients)
        if split.note:
            log.warning(split.note)
        self.partition = split.describe()

    def _restore_or_start(self) -> int:
        ckpt = self.out.load_checkpoint() if self.config.resume else None
        if self.config.resume and ckpt is None:
            log.warning("resume: %s holds no checkpoint; starting a new run", self.out.path)
        if ckpt is not None and ckpt.round >= self.config.num_server_rounds:
            raise ConfigError(f"the run in {self.out.path} already has {ckpt.round} rounds; set "
                              f"num-server-rounds above {ckpt.round} to continue it")
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
        restore_privacy(self.aggregator, ckpt.extra.get("privacy"))  # sigma and accountant, exactly
        self.feedback = ErrorFeedback(ckpt.residual)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.out.truncate_metrics(ckpt.round)
        self.rounds = [r for r in self.out.read_metrics()]
        lost = ckpt.extra.get("record")  # stopped after the checkpoint, before its metrics line
        if lost and (not self.rounds or self.rounds[-1]["round"] < ckpt.round):
            self.rounds.append(lost)
            self.out.append_metrics(self.rounds[-1])
        log.warning("resuming the run in %s after round %d", self.out.path, ckpt.round)
        return ckpt.round + 1

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        now = self.config.to_mapping()
        differ = sorted(k for k in set(now) | set(saved)
                        if k not in RESUMABLE and now.get(k) != saved.get(k))
        if differ:
            raise ConfigError(f"cannot resume {self.out.path}: its run differs in {', '.join(differ)} "
                              "(its history would mean nothing); use another --out or --overwrite")

    # -- the loop ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        display = RoundDisplay(self.config.num_server_rounds, self.start_round - 1)
        with display:
            if self.start_round == 1:
                display.show(self.rounds[0])
            for rnd in range(self.start_round, self.config.num_server_rounds + 1):
                record = self.run_round(rnd)
                if not record["clients"]:
                    display.fail(rnd, _reasons(record["dropped"]))
                self.rounds.append(record)
                self.clock.lap("other")
                self._checkpoint(rnd)  # holds the record too: see _restore_or_start
                self.out.write_summary(self.summary())
                self.clock.lap("checkpoint")
                record["seconds"], record["profile"] = self.clock.finish()
                self.out.append_metrics(record)
                display.show(record)
        return self.finish()

    def run_round(self, rnd: int) -> dict[str, Any]:
        """One round's record; its ``seconds`` and ``profile`` so far (:meth:`run` adds the checkpoint)."""
        clock = self.clock = RoundClock()
        round_log = RoundLog(rnd)
        nodes = self._sample(rnd)
        clock.lap("other")
        messages = self._messages(rnd, nodes)
        clock.lap("downlink")
        sent_at = time.time()
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout)
        clock.lap("transport")
        clock.window = (sent_at, time.time())
        # the grid sets message ids on push; an error reply the SuperLink writes for a node
        # that went offline comes from the SuperLink itself, so map replies by what they answer
        addressee = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        self.aggregator.begin(rnd, self.versions.state)
        for reply in replies:
            self._receive(reply, addressee.get(reply.metadata.reply_to_message_id,
                                               reply.metadata.src_node_id), round_log)
        clock.split_clients(round_log.clients)
        clock.lap("validate")
        self._accumulate(round_log)
        clock.lap("aggregate")
        missing = set(nodes) - {c["node"] for c in round_log.clients} - {
            d["node"] for d in round_log.dropped}
        for node in sorted(missing):
            round_log.drop(node, "no reply before the round timeout")
        increment = self._advance(rnd) if any(c["used"] for c in round_log.clients) else 0
        traffic = {"bytes_up": sum(c["bytes_up"] for c in round_log.clients),
                   "bytes_down": sum(c["bytes_down"] for c in round_log.clients),
                   "bytes_increment": increment,
                   "clients": sum(c["used"] for c in round_log.clients)}
        clock.lap("other")
        record = self._evaluate(rnd, traffic)
        clock.lap("evaluate")
        seconds, profile = clock.finish()
        record.update(seconds=seconds, profile=profile, sampled=len(nodes),
                      client_metrics=round_log.clients,
                      dropped=round_log.dropped, aggregator=self.aggregator.metrics(),
                      version=self.versions.latest)
        record.update(_mean_client_metrics(round_log.clients))
        record.update(round_privacy(self.aggregator, round_log.clients))
        return record

    def _sample(self, rnd: int) -> list[int]:
        """This round's nodes; none when client-level DP's budget cannot pay for the round.

        Without DP the draw is seeded by the run seed. Under DP it is secret (OS entropy):
        amplification by subsampling only holds against someone who cannot predict it.
        """
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
        if isinstance(self.aggregator, CentralDP) and not self.aggregator.plan(rnd, len(nodes), count):
            return []
        secret = self.config.dp != "none"
        rng = random.SystemRandom() if secret else random.Random(self.config.seed * 7919 + rnd)
        return sorted(rng.sample(nodes, count))

    def _messages(self, rnd: int, nodes: list[int]) -> list[Message]:
        instructions = self.aggregator.instructions(rnd, nodes)
        self._sent: dict[int, tuple[int, str]] = {}
        messages = []
        for node in nodes:
            payload, kind = self.versions.payload_for(self.node_versions.get(node, EMPTY_VERSION), rnd)
            self._sent[node] = (len(payload), kind)
            order = TrainInstruction(rnd, self.config, self.num_labels, payload,
                                     instructions.get(node, {}), self.labels)
            messages.append(Message(order.to_record(), dst_node_id=node,
                                    message_type=MessageType.TRAIN, group_id=str(rnd)))
        return messages

    @cached_property
    def replies(self) -> ReplyChecker:
        return ReplyChecker(self.config, self.uplink_spec)

    def _receive(self, reply: Message, node: int, round_log: RoundLog) -> None:
        """Check one reply; a usable update waits in ``round_log.pending`` for :meth:`_accumulate`.

        Whatever a reply holds costs that reply only: a failed check, and any other
        exception it causes, drops it with a named reason.
        """
        try:
            self._check_reply(reply, node, round_log)
        except Rejected as err:
            round_log.drop(node, str(err), err.check)
        except Exception as err:  # noqa: BLE001 - a hostile reply must never stop the round
            log.exception("round %d: reply of node %d", round_log.round, node)
            round_log.drop(node, f"unexpected {type(err).__name__}: {err}", "internal")

    def _check_reply(self, reply: Message, node: int, round_log: RoundLog) -> None:
        if node not in self._sent:
            raise Rejected("unsolicited", "the server sent this node nothing this round")
        if any(node in (c["node"] for c in log_) for log_ in (round_log.clients, round_log.dropped)):
            raise Rejected("duplicate", "a second reply for this round")
        bytes_down, kind = self._sent[node]
        answer = self.replies.parse(reply, self.versions.latest)
        self.node_versions[node] = answer.held_version
        if answer.status == "stale" and answer.held_version == EMPTY_VERSION:
            self.node_versions[node] = FULL_ONLY  # cannot rebuild the seeded first version
        round_log.clients.append({  # the client's own keys first: they can never overwrite these
            **answer.metrics, **answer.report, "node": node, "bytes_up": len(answer.payload),
            "bytes_down": bytes_down, "downlink": kind, "status": answer.status,
            "num_examples": answer.num_examples, "used": False})
        if answer.status == "exhausted":
            self.exhausted.add(node)
        if answer.status != "ok":
            raise Rejected(f"client-{answer.status}", answer.reason)
        update = self.replies.update(node, answer, Sent(self.run_id, round_log.round, self.versions.latest))
        try:
            self.aggregator.check(update)
        except AggregationError as err:
            raise Rejected(type(err).__name__, str(err)) from err
        round_log.pending.append((order_key(update), node, answer, l2_norm(update.delta)))

    def _accumulate(self, round_log: RoundLog) -> None:
        """Screen the round's checked updates by norm, then fold them in a fixed order.

        The order is that of :func:`order_key` (content, not arrival or node id), so the
        result is bitwise reproducible and independent of the replies that were dropped.
        Updates are decoded again here rather than held, so memory stays at their payloads.
        """
        entries = {c["node"]: c for c in round_log.clients}
        outliers = norm_outliers({node: norm for _, node, _, norm in round_log.pending},
                                 self.config.norm_screen)
        for _, node, answer, _ in sorted(round_log.pending, key=lambda item: (item[0], item[1])):
            if node in outliers:
                round_log.drop(node, f"norm-screen: {outliers[node]}", "norm-screen")
                continue
            try:
                sent = Sent(self.run_id, round_log.round, self.versions.latest)
                self.aggregator.accumulate(self.replies.update(node, answer, sent))
            except Exception as err:  # noqa: BLE001 - as in _receive
                log.exception("round %d: update of node %d", round_log.round, node)
                round_log.drop(node, f"unexpected {type(err).__name__}: {err}", "internal")
                continue
            entries[node]["used"] = True
        round_log.pending.clear()

    def _advance(self, rnd: int) -> int:
        """Aggregate, step the server optimizer, compress the increment (with server-side error
        feedback), apply it."""
        delta = self.optimizer.step(self.aggregator.finalize())  # server-optimizer none: as it is
        self.clock.lap("aggregate")
        wire = self.aggregator.pack_downlink(delta, latest_round=True)
        compensate = self.config.error_feedback and self.part.uses_error_feedback
        payload, sent = encode_with_feedback(
            wire, self.feedback if compensate else None,
            lambda tensors: self.versions.encode_increment(tensors, rnd, downlink_codec(self.config)),
            lambda data: decode(data, self.downlink_spec,
                                max_payload_bytes=self.config.max_payload_bytes).tensors,
            need_decoded=True)
        state = add(self.versions.state, self.part.unpack_downlink(sent))
        self.versions.push(self.versions.latest + 1, state, payload)
        self.clock.lap("downlink")
        return len(payload)

    def _evaluate(self, rnd: int, traffic: dict[str, int]) -> dict[str, Any]:
        if self.test_data is None:
            return {"round": rnd, **traffic}
        self.part.load_global(self.model, self.versions.state)
        metrics = evaluate(self.model, self.test_data)
        return {"round": rnd, **metrics, **traffic}

    def _checkpoint(self, rnd: int) -> None:
        self.out.save_checkpoint(Checkpoint(
            round=rnd, config=self.config.to_mapping(), states=self.versions.snapshot(),
            increments=dict(self.versions.increments), node_versions=self.node_versions,
            residual=self.feedback.residual, optimizer=self.optimizer.state_dict(),
            extra={"exhausted": sorted(self.exhausted), "run_id": self.run_id,
                   "privacy": privacy_state(self.aggregator), "record": self.rounds[-1]}))

    # -- results -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        keep = ("round", "accuracy", "loss", "perplexity", "exact_match", "token_f1", "bytes_up",
                "bytes_down", "clients", "sampled", "seconds", "train_loss", "dropped", "epsilon")
        rounds = cumulative([{k: r[k] for k in keep if k in r} for r in self.rounds])
        aggregated = sum(1 for r in self.rounds if r.get("clients"))
        target = self.config.target_accuracy
        return {"config": self.config.to_mapping(), "run_id": self.run_id, "num_labels": self.num_labels,
                "labels": list(self.labels), "status": "ok" if aggregated else "failed",
                "rounds_aggregated": aggregated, "rounds": rounds, "final": rounds[-1] if rounds else {},
                "to_target": to_target(rounds, target) if target else None,
                "exhausted_clients": sorted(self.exhausted), "partition": self.partition}

    def finish(self) -> dict[str, Any]:
        from .plots import plot_rounds

        self.part.load_global(self.model, self.versions.state)
        self.model.export(self.out.path / "adapter", self.model.adapter_state(), self.labels)
        summary = self.summary()
        pngs = plot_rounds(summary["rounds"], self.out.path)
        pngs += self.aggregator.plots(self.rounds, self.out.path)
        summary["plots"] = [p.name for p in pngs]
        self.out.write_summary(summary)
        return summary


def _mean_client_metrics(clients: list[dict[str, Any]]) -> dict[str, float]:
    """The example-weighted mean training loss of the used updates (their counts were checked)."""
    used = [c for c in clients if c["used"]]
    total = sum(c["num_examples"] for c in used)
    if not total:
        return {}
    return {"train_loss": sum(c.get("train-loss", 0.0) * c["num_examples"] for c in used) / total}


def _reasons(dropped: list[dict[str, Any]], limit: int = 3) -> str:
    """The first few drop reasons of a round, one line."""
    if not dropped:
        return "no node was sampled"
    shown = "; ".join(f"node {d['node']}: {d['reason']}" for d in dropped[:limit])
    return shown + (f"; and {len(dropped) - limit} more" if len(dropped) > limit else "")
