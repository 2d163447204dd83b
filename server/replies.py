"""One reply-validation step: a client's reply is checked in full before the server uses any of it.

The server assumes any node may be buggy or hostile. Everything a reply carries goes
through :meth:`ReplyChecker.parse` (the closed schema of :class:`TrainReply` plus the
keys the server keeps for itself) and, for an update, :meth:`ReplyChecker.update`
(bounds that depend on the run and on what the server sent that node this round). A
failed check raises :class:`Rejected` naming the check; the round loop drops that reply
alone, with the reason in metrics.jsonl. In the spirit of Flower's own reply checks
(``flwr.serverapp``: a reply must answer a message that was sent), but covering the content.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass

import torch
from flwr.app import Message

from pollinate.aggregators import ClientUpdate
from pollinate.codec import CodecError, decode
from pollinate.config import RunConfig
from pollinate.protocol import EMPTY_VERSION, ProtocolError, TrainReply
from pollinate.spec import AdapterSpec, is_lora_a, is_lora_b

# what the server records about each client in metrics.jsonl; a client may not send these keys
SERVER_KEYS = frozenset({"node", "bytes_up", "bytes_down", "downlink", "status", "num_examples", "used",
                         "reason", "check"})
DEFAULT_MAX_CLIENT_EXAMPLES = 1_000_000
SPREAD_FLOOR = 1e-3  # the norm screen's MAD is at least this fraction of the median norm


class Rejected(ValueError):
    """A reply failed ``check``; the server drops it for the round."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check = check


@dataclass(frozen=True)
class Sent:
    """What the server sent one node this round: an update must answer exactly this."""

    run_id: int
    round: int
    version: int  # the global version the downlink takes the node to (the update's base)


def max_client_examples(config: RunConfig) -> int:
    """The largest ``num-examples`` a reply may claim (and so the largest weight it can get).

    ``max-client-examples`` when set; else ``max-train-examples`` (simulated clients never
    hold more), else :data:`DEFAULT_MAX_CLIENT_EXAMPLES`.
    """
    return config.max_client_examples or config.max_train_examples or DEFAULT_MAX_CLIENT_EXAMPLES


class ReplyChecker:
    """Parses and bounds the replies of one run (``uplink`` is the method's uplink spec)."""

    def __init__(self, config: RunConfig, uplink: AdapterSpec):
        self.config = config
        self.uplink = uplink
        self.max_examples = max_client_examples(config)

    def parse(self, message: Message, latest: int) -> TrainReply:
        """The reply as a typed record: Flower error, schema, server keys, held version."""
        if message.has_error():
            raise Rejected("client-error", str(message.error.reason)[:1024])
        try:
            answer = TrainReply.from_message(message)
        except ProtocolError as err:
            raise Rejected(err.field, f"malformed reply: {err}") from err
        clash = sorted((set(answer.metrics) | set(answer.report)) & SERVER_KEYS)
        if clash:
            raise Rejected("server-keys", f"the reply sets {clash}, which only the server records")
        if not EMPTY_VERSION <= answer.held_version <= latest:
            raise Rejected("held-version", f"{answer.held_version} is not a version of this run "
                           f"({EMPTY_VERSION}..{latest})")
        return answer

    def update(self, node: int, answer: TrainReply, sent: Sent) -> ClientUpdate:
        """The decoded update of an ``ok`` reply, checked against the run and ``sent``."""
        if not 1 <= answer.num_examples <= self.max_examples:
            raise Rejected("num-examples", f"{answer.num_examples} is outside [1, {self.max_examples}] "
                           "(max-client-examples)")
        if not answer.payload:
            raise Rejected("payload", "empty")
        try:  # the payload first: its size bounds the work every later check does
            delta = decode(answer.payload, self.uplink, max_payload_bytes=self.config.max_payload_bytes)
        except CodecError as err:
            raise Rejected(type(err).__name__, str(err)) from err
        header = delta.header
        for name, got, want in (("run id", header.run_id, sent.run_id), ("round", header.round, sent.round),
                                ("base version", header.base_version, sent.version),
                                ("target version", header.target_version, sent.version)):
            if got != want:
                raise Rejected("header", f"{name} is {got}, the server sent {want} (replayed or foreign)")
        if answer.held_version != sent.version:
            raise Rejected("held-version", f"the update claims version {answer.held_version}, "
                           f"the server sent version {sent.version}")
        rank, alpha = answer.metrics.get("rank"), answer.metrics.get("alpha")
        if rank is None or rank != int(rank) or rank < 1:
            raise Rejected("rank", f"{rank} is not a positive integer")
        if alpha != self.config.lora_alpha:
            raise Rejected("alpha", f"{alpha} is not the run's lora-alpha {self.config.lora_alpha}")
        for name, tensor in delta.tensors.items():
            axis = 0 if is_lora_a(name) else 1 if is_lora_b(name) else None
            if axis is not None and tensor.dim() == 2 and tensor.shape[axis] != rank:
                raise Rejected("rank", f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"not rank {int(rank)}")
        return ClientUpdate(node, delta.tensors, answer.num_examples, int(rank), float(alpha),
                            answer.metrics, answer.report)


def order_key(update: ClientUpdate) -> bytes:
    """Updates are accumulated in the order of this key: a digest of what they contribute.

    Floating-point sums depend on their order. Sorting by content (the decoded tensors and
    the weight, not the payload, whose header names the run) makes a round's result
    independent of the order replies arrive in and of node ids (random in simulations),
    so a run is reproducible and dropping a client changes nothing else.
    """
    digest = hashlib.sha256(f"{update.num_examples}/{update.rank}/{update.alpha}".encode())
    for name in sorted(update.delta):
        tensor = update.delta[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.digest()


def norm_outliers(norms: dict[int, float], k: float) -> dict[int, str]:
    """Nodes whose update norm exceeds median + ``k`` x MAD of the round, with the reason.

    MAD is the median absolute deviation, floored at :data:`SPREAD_FLOOR` x median so
    that equal honest norms do not make every small difference an outlier. Needs three
    updates (with two the median sits between them); ``k <= 0`` screens nothing.
    """
    if k <= 0 or len(norms) < 3:
        return {}
    median = statistics.median(norms.values())
    spread = max(statistics.median(abs(n - median) for n in norms.values()), SPREAD_FLOOR * median)
    bar = median + k * spread
    return {node: f"update norm {n:.4g} exceeds median {median:.4g} + {k:g} x MAD {spread:.4g} = {bar:.4g}"
            for node, n in norms.items() if n > bar}
