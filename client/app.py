"""The Pollinate ClientApp: apply the downlink delta, train locally, send an encoded update.

Per round: decode the global delta from the version this node holds, rebuild the
global adapter, let the method's client half prepare the model, train, and send the
method's update through the codec (with error feedback). Nothing but the codec's
payload bytes carries adapter tensors.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from pollinate.aggregators import Aggregator, ClientPart, resolve
from pollinate.codec import (
    CodecError,
    Delta,
    DeltaHeader,
    ErrorFeedback,
    decode,
    encode,
    encode_with_feedback,
)
from pollinate.deltas import add, digest
from pollinate.modeling import ModelSpec
from pollinate.protocol import EMPTY_VERSION, TrainInstruction, TrainReply, uplink_codec
from pollinate.spec import Tensors

from .privacy import ClientPrivacy
from .session import NodeSettings, data_key, local_data, model_for, seeded_initial
from .state import NodeMemory
from .trainer import (
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    optimizer_steps,
    round_learning_rate,
    train,
)

log = logging.getLogger("pollinate.client")
app = ClientApp()
OPTIMIZER_STATE = "optimizer"  # NodeMemory.extra key of the local optimizer's state (client-optimizer-state)


def rebuild_anchor(aggregator_cls: type[Aggregator], options: dict[str, Any], order: TrainInstruction,
                   node: NodeSettings, expected: bytes) -> Tensors | None:
    """The seeded first global version, if this node can rebuild the one the server digested.

    Built at this node's own rank first, then at the run's global rank (the server's: a
    node of a lower rank holds the global adapter at that rank and truncates it to its own
    when it loads it); ``None`` when neither matches the server's digest.
    """
    key = json.dumps(options, sort_keys=True)
    for rank in dict.fromkeys([node.rank, order.config.global_rank]):
        spec = ModelSpec.from_config(order.config, order.num_labels, rank)
        seeded = seeded_initial(aggregator_cls, key, spec, node.device)
        if digest(seeded) == expected:
            return seeded
    return None


CLIENT_FAILURE = 1  # Error.code of a round this node could not complete (the reason says why)


@app.train()
def handle_train(msg: Message, context: Context) -> Message:
    """One round; a failure is an error reply with a one-line reason (the traceback stays in this
    node's log at DEBUG level), so the server logs why and the node's console stays readable."""
    try:
        order = TrainInstruction.from_message(msg)
        reply = run_round(order, context)
    except Exception as err:  # noqa: BLE001 - any failure costs this node's update only
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        log.warning("round failed on this node: %s", reason)
        log.debug("traceback", exc_info=True)
        return Message(error=Error(code=CLIENT_FAILURE, reason=reason), reply_to=msg)
    reply.report = {**reply.report, **ray_node()}
    return Message(reply.to_record(), reply_to=msg)


def ray_node() -> dict[str, str]:
    """``{"ray-node": id}`` of the Ray node this client runs on, or ``{}`` outside Ray.

    The server records it with the client's metrics, so metrics.jsonl shows which machine of
    a Ray cluster ran each client (docs/deployment.md, "Simulating across machines"). Ray is
    only looked at where it is already imported: a deployed ClientApp never imports it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    return {"ray-node": ray.get_runtime_context().get_node_id()}


def run_round(order: TrainInstruction, context: Context) -> TrainReply:
    started, clock = time.time(), time.perf_counter()  # reported for the server's round profile
    config = order.config
    node = NodeSettings.from_node_config(dict(context.node_config), config)
    memory = NodeMemory.load(context.state)
    aggregator_cls = resolve(config.aggregator)
    options = config.aggregator_option_map
    aggregator = aggregator_cls(**options)
    part: ClientPart = aggregator_cls.client_part(options, order.instructions, context.node_config)
    model = model_for(aggregator_cls, ModelSpec.from_config(config, order.num_labels, node.rank), node.device)
    seeded_initial(aggregator_cls, json.dumps(options, sort_keys=True), model.spec, node.device)
    try:
        down = decode(order.payload, aggregator.downlink_spec(model),
                      max_payload_bytes=config.max_payload_bytes)
    except CodecError as err:
        return _refuse("stale", f"downlink rejected: {err}", memory, config)
    base = down.header.base_version
    if base != EMPTY_VERSION and base != memory.held_version:
        seeded = rebuild_anchor(aggregator_cls, options, order, node, down.header.base_digest) \
            if memory.held_version == EMPTY_VERSION else None
        if seeded is None:
            return _refuse("stale", f"downlink is from version {base}, node holds "
                           f"{memory.held_version or 'nothing it can rebuild it from'}", memory, config)
        memory.held_state, memory.held_version = seeded, base
    held = {} if base == EMPTY_VERSION else memory.held_state
    memory.held_state = add(held, part.unpack_downlink(down.tensors))
    memory.held_version = down.header.target_version
    decoded = time.perf_counter()

    data = local_data(data_key(config), node.data_path, node.partition_id, node.num_partitions,
                      order.labels)
    privacy = ClientPrivacy(config, memory, len(data))
    if privacy.exhausted:
        return _refuse("exhausted", privacy.exhausted, memory, config)
    seed = config.seed + 1000 * order.round + (node.partition_id or 0)
    torch.manual_seed(seed)
    part.load_global(model, memory.held_state)
    part.prepare(model, data, _probe_batches(model, data, config, seed))
    start = model.adapter_state()
    training = config.replace(learning_rate=round_learning_rate(config, order.round))
    optimizer = make_optimizer(model, training)
    if config.client_optimizer_state:
        load_optimizer_state(optimizer, model, memory.extra.get(OPTIMIZER_STATE))
    result = (privacy.train(model, data, optimizer) if config.dp == "sample"
              else train(model, data, training, seed, optimizer))
    if config.client_optimizer_state:
        memory.extra[OPTIMIZER_STATE] = optimizer_state(optimizer, model, memory.extra.get(OPTIMIZER_STATE))
    update = privacy.privatize(part.update(model, start))  # clip + noise before error feedback/codec

    encoding = time.perf_counter()
    use_feedback = config.error_feedback and part.uses_error_feedback
    feedback = ErrorFeedback(memory.residual) if use_feedback else None
    header = DeltaHeader(run_id=context.run_id, round=order.round,
                         base_version=memory.held_version, target_version=memory.held_version)
    payload, _ = encode_with_feedback(
        update, feedback, lambda tensors: encode(Delta(header, tensors), uplink_codec(config)),
        lambda data: decode(data, aggregator.uplink_spec(model),
                            max_payload_bytes=config.max_payload_bytes).tensors)
    if feedback is not None:
        memory.residual = feedback.residual
    encoded = time.perf_counter()
    memory.store(context.state, config.node_state_dir, context.node_id)
    metrics = {"train-loss": result.loss, "train-seconds": result.seconds, "steps": result.steps,
               "rank": node.rank, "alpha": config.lora_alpha, "bytes-down": len(order.payload),
               "learning-rate": training.learning_rate,
               **({"optimizer-steps": optimizer_steps(memory.extra[OPTIMIZER_STATE])}
                  if config.client_optimizer_state else {}),
               "decode-seconds": decoded - clock, "encode-seconds": encoded - encoding,
               "client-started": started, "client-seconds": time.perf_counter() - clock,
               **privacy.metrics()}
    return TrainReply("ok", payload, len(data), memory.held_version, metrics, part.report())


def _probe_batches(model, data, config, seed: int, count: int = 2) -> list:
    from pollinate.data import batches

    it = batches(data, config.batch_size, model.tokenizer.pad_token_id, shuffle=True, seed=seed,
                 device=model.device)
    return [b for _, b in zip(range(count), it, strict=False)]


def _refuse(status: str, reason: str, memory: NodeMemory, config) -> TrainReply:
    log.warning("not training this round: %s", reason)
    return TrainReply(status, b"", 0, memory.held_version, {}, {}, reason)
