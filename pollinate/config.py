"""Run configuration: one validated, typed record shared by server, clients and the CLI.

Flower hands apps a flat ``UserConfig`` mapping with hyphenated keys (from
``[tool.flwr.app.config]``, ``--run-config`` or our own launcher). Everything that
reads configuration goes through :class:`RunConfig` so that a typo or an impossible
value fails fast with a message naming the option, on the server, before any round.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pollinate.codec.encodings import DENSE_ENCODINGS, ENCODINGS


class ConfigError(ValueError):
    """A configuration option is unknown, of the wrong type or out of range."""


TASKS = ("classification", "causal-lm")
PARTITIONS = ("iid", "dirichlet", "classes")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
SERVER_OPTIMIZERS = ("none", "avgm", "adam", "yogi", "adagrad")
DP_MODES = ("none", "sample", "client-central", "client-local")
DATA_FORMATS = ("auto", "prompt-response", "alpaca", "messages")
BASE_DTYPES = ("fp32", "bf16")
QUANTIZATIONS = ("none", "4bit")


def option(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A run-config field with its one-line help (and allowed values), like peft's config fields."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    """Every option of a Pollinate run; field ``foo_bar`` is run-config key ``foo-bar``."""

    # federation
    num_server_rounds: int = option(5, "federated rounds to run")
    fraction_train: float = option(1.0, "share of connected nodes sampled each round, in (0, 1]")
    min_train_nodes: int = option(2, "nodes to wait for before a round starts")
    round_timeout: float = option(600.0, "seconds to wait for the sampled nodes' replies")
    ray_address: str = option("", "pollinate simulate: HOST:PORT (or auto) of a running Ray cluster to "
                                  "run the clients on; empty = start Ray on this machine")
    # task, model and data
    task: str = option("classification", "classification or causal-lm", TASKS)
    model: str = option("", "model path, random:llama-tiny or (classification) random:bert-tiny; "
                            "empty = the bundled all-MiniLM-L6-v2")
    train_data: str = option("", "training table (CSV, JSONL or saved dataset); empty = generated task")
    test_data: str = option("", "held-out table the server scores; empty = test-fraction of train-data")
    test_fraction: float = option(0.1, "share of train-data held out for the server when test-data is "
                                       "empty, in (0, 1)")
    text_column: str = option("text", "column holding the input text (classification)")
    label_column: str = option("label", "column holding the label: integers or names (classification)")
    prompt_column: str = option("prompt", "column holding the prompt (causal-lm)")
    response_column: str = option("response", "column holding the response (causal-lm)")
    num_clients: int = option(10, "simulated clients (SuperNodes); the partitions of train-data")
    partition: str = option("dirichlet", "how train-data is split across simulated clients", PARTITIONS)
    dirichlet_alpha: float = option(0.5, "label skew of partition=dirichlet (smaller = more skewed)")
    classes_per_client: int = option(2, "labels per client with partition=classes")
    max_train_examples: int = option(0, "cap on each client's examples, simulated or deployed "
                                        "(0 = all of its data)")
    test_examples: int = option(500, "cap on the server's held-out examples (0 = all)")
    max_length: int = option(64, "tokens kept per example")
    # causal LMs (docs/llm.md)
    data_format: str = option("auto", "causal-lm data: auto = from the columns (messages, "
                                      "instruction/input/output, prompt/response)", DATA_FORMATS)
    eval_generate: int = option(0, "held-out instruction examples the server answers greedily each "
                                   "round, scored by exact match and token F1 (0 = off)")
    eval_max_new_tokens: int = option(32, "new-token budget of each eval-generate answer")
    gradient_checkpointing: bool = option(False, "recompute activations in backward instead of "
                                                 "keeping them (less memory, ~30% more compute)")
    base_dtype: str = option("fp32", "dtype of the frozen base weights (causal-lm); the adapter stays "
                                     "fp32", BASE_DTYPES)
    quantization: str = option("none", "4bit = NF4 base weights through bitsandbytes, QLoRA-style "
                                       "(causal-lm, CUDA nodes only)", QUANTIZATIONS)
    loss_chunk_size: int = option(1024, "tokens per chunk of the causal-LM loss, which never holds "
                                        "all logits (0 = the model's own loss)")
    compile: bool = option(False, "torch.compile each decoder layer before local training (causal-lm)")
    # adapter
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: float = option(16.0, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: str = option("auto", "comma-separated module names to adapt; auto = per model family")
    rank_profile: str = option("", "comma-separated LoRA ranks of the simulated clients, cycled")
    # aggregation
    aggregator: str = option("fedit", "method: a built-in name, module:Class path or entry point "
                                      "(`pollinate aggregators`)")
    aggregator_options: str = option("", "the method's options: key=value,key=[1,2] or a JSON object")
    # local training
    local_epochs: int = option(3, "local epochs per round (used when local-steps is 0)")
    local_steps: int = option(0, "local optimizer steps per round (0 = local-epochs)")
    batch_size: int = option(32, "local batch size")
    learning_rate: float = option(3e-3, "local learning rate")
    optimizer: str = option("adamw", "local optimizer; sgd uses momentum 0.9 (docs/privacy.md)", OPTIMIZERS)
    client_optimizer_state: bool = option(False, "keep each node's local optimizer state (AdamW moments) "
                                                 "across its rounds instead of a fresh one per round")
    lr_schedule: str = option("constant", "learning rate across rounds: cosine decays it to 10% by the "
                                          "last round (after any warm-up)", LR_SCHEDULES)
    lr_warmup_rounds: int = option(0, "rounds whose learning rate rises linearly to learning-rate "
                                      "(round r of W: r/W of it)")
    restricted_softmax: float = option(-1.0, "FedRS (Li & Zhan, KDD 2021): in local training, the logits of "
                                             "classes absent from the client's data are scaled by this, in "
                                             "[0, 1] (1 = off); keeps label skew from pushing absent "
                                             "classes' head rows. -1 = auto: 0 for task=classification "
                                             "without dp=sample, else off")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off); the per-sample clip of dp=sample")
    precision: str = option("auto", "autocast precision; auto = bf16 on GPUs, fp32 on CPUs", PRECISIONS)
    device: str = option("auto", "cpu, cuda, cuda:1, mps or auto")
    seed: int = option(0, "seed for data, partitions, model init and sampling")
    # server optimizer (docs/aggregators.md, "Server optimizers")
    server_optimizer: str = option("none", "optimizer the server applies to each round's global delta: "
                                           "avgm = momentum, adam / yogi / adagrad (Reddi et al. 2021)",
                                   SERVER_OPTIMIZERS)
    server_learning_rate: float = option(0.0, "server step size (0 = the optimizer's default: 1 for avgm, "
                                              "0.01 for adam, yogi, adagrad)")
    server_momentum: float = option(0.9, "server beta_1: momentum of avgm, first-moment decay of adam, "
                                         "yogi and adagrad, in [0, 1)")
    server_beta2: float = option(0.99, "server beta_2: second-moment decay of adam and yogi, in [0, 1)")
    server_tau: float = option(1e-3, "server tau: adaptivity floor added to sqrt(v) (adam, yogi, "
                                     "adagrad), > 0")
    # differential privacy (docs/privacy.md)
    dp: str = option("none", "differential privacy: sample (DP-SGD), client-central or client-local",
                     DP_MODES)
    target_epsilon: float = option(8.0, "privacy budget epsilon; the run stops a client or round "
                                        "that would exceed it")
    delta: float = option(1e-5, "privacy delta, in (0, 1)")
    noise_multiplier: float = option(-1.0, "noise std / clip norm (-1 = solve it from target-epsilon)")
    clip_norm: float = option(1.0, "clip norm of a client's update with client-level DP")
    # wire format
    codec: str = option("sign", "uplink encoding of client updates", ENCODINGS)
    density: float = option(0.1, "share of entries a top-k uplink codec keeps, in (0, 1]")
    error_feedback: bool = option(True, "carry what a lossy codec dropped into the next round")
    downlink_codec: str = option("sign", "downlink encoding of the global increment", ENCODINGS)
    downlink_density: float = option(0.1, "share of entries a top-k downlink codec keeps, in (0, 1]")
    head_codec: str = option("int4-row", "dense encoding of the classification head's tensors both ways "
                                         "(empty = codec / downlink-codec like the rest)",
                             ("", *DENSE_ENCODINGS))
    max_payload_bytes: int = option(64 * 1024 * 1024, "largest payload accepted either way")
    keep_versions: int = option(8, "global versions kept for delta downlinks to lagging nodes")
    # untrusted clients (docs/architecture.md, "Hostile clients")
    max_client_examples: int = option(0, "largest num-examples a reply may claim, its weight cap "
                                         "(0 = max-train-examples if set, else 1,000,000)")
    norm_screen: float = option(0.0, "k: drop updates whose norm exceeds the round's median + k x MAD "
                                     "(0 = off)")
    # outputs
    out: str = option("", "run directory; empty = a fresh runs/<date>-<time>[-run<id>]")
    resume: bool = option(False, "continue the run whose checkpoint is in out")
    overwrite: bool = option(False, "replace the run in out")
    node_state_dir: str = option("", "directory where each node keeps its memory between rounds (held "
                                     "version, residual, accountant) as <node-id>.safetensors; empty = "
                                     "Flower's Context (pollinate simulate: <out>/nodes)")
    target_accuracy: float = option(0.0, "accuracy whose rounds, seconds and bytes to reach summary.json "
                                         "reports (0 = none)")
    num_labels: int = option(0, "label count (0 = from the data); a deployed server without data needs it")
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._check()

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, allow_extra: bool = True) -> RunConfig:
        """Build from hyphenated (or underscored) keys, coercing strings and numbers.

        Keys that are not options of Pollinate's core go to ``extra`` when ``allow_extra``
        (methods such as DP or selective layers read their own keys from there and
        validate them); otherwise an unknown key is an error.
        """
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                if not allow_extra:
                    raise ConfigError(f"unknown option {key!r}{suggest(key, option_names())}")
                extra[key.replace("_", "-")] = value
                continue
            kwargs[name] = coerce(_key(name), value, known[name].type)
        return cls(**kwargs, extra=extra)

    def to_mapping(self) -> dict[str, bool | int | float | str]:
        """Flat hyphenated mapping, the inverse of :meth:`from_mapping` (``extra`` included)."""
        out: dict[str, Any] = {
            f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "extra"
        }
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_mapping(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_mapping(json.loads(text))

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    # -- derived values -----------------------------------------------------------

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def aggregator_option_map(self) -> dict[str, Any]:
        """``aggregator-options`` (``key=value,...``, values parsed as JSON where they can be).

        ``seed`` defaults to the run seed so methods that draw random inits agree on it.
        """
        return {"seed": self.seed, **parse_options(self.aggregator_options, "aggregator-options")}

    @property
    def absent_class_scale(self) -> float:
        """The factor ``restricted-softmax`` puts on absent classes' logits (1: off); ``auto`` is 0
        where it applies (classification without DP-SGD), else 1."""
        if self.restricted_softmax >= 0:
            return self.restricted_softmax
        return 0.0 if self.task == "classification" and self.dp != "sample" else 1.0

    def rank_for(self, partition_id: int) -> int:
        """The LoRA rank of a simulated client: its entry of ``rank-profile`` (cycled), else ``lora-rank``."""
        if not self.rank_profile:
            return self.lora_rank
        ranks = [int(r) for r in self.rank_profile.split(",") if r.strip()]
        return ranks[partition_id % len(ranks)]

    @property
    def global_rank(self) -> int:
        """The rank of the global adapter: the largest any client is configured with.

        Server and clients derive it from the same config, so a client of a lower rank can
        still rebuild the seeded first global version instead of downloading it.
        """
        return max([self.lora_rank] + [self.rank_for(i) for i in range(self.num_clients)])

    # -- validation ---------------------------------------------------------------

    def _check(self) -> None:
        positive = ("num_server_rounds", "num_clients", "lora_rank", "batch_size", "max_length",
                    "keep_versions", "max_payload_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_key(name)} must be > 0, got {getattr(self, name)}")
        non_negative = ("local_epochs", "local_steps", "max_train_examples", "test_examples",
                        "max_grad_norm", "lora_dropout", "min_train_nodes", "max_client_examples",
                        "norm_screen")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        if self.local_epochs == 0 and self.local_steps == 0:
            raise ConfigError("one of local-epochs or local-steps must be > 0")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        for name in ("density", "downlink_density"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{_key(name)} must be in (0, 1], got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning-rate must be > 0, got {self.learning_rate}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora-alpha must be > 0, got {self.lora_alpha}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        if self.classes_per_client <= 0:
            raise ConfigError(f"classes-per-client must be > 0, got {self.classes_per_client}")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"{_key(f.name)} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, f.name)!r}"
                                  f"{suggest(str(getattr(self, f.name)), allowed)}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ConfigError(f"target-accuracy must be in [0, 1], got {self.target_accuracy}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.ray_address not in ("", "auto") and split_host_port(self.ray_address) is None:
            raise ConfigError(f"ray-address must be HOST:PORT (the address `ray start --head` prints) or "
                              f"auto, got {self.ray_address!r}")
        if self.resume and self.overwrite:
            raise ConfigError("give at most one of resume and overwrite")
        if not self.target_module_list:
            raise ConfigError("target-modules must name at least one module")
        if self.rank_profile:
            try:
                ranks = [int(r) for r in self.rank_profile.split(",") if r.strip()]
            except ValueError as err:
                raise ConfigError(f"rank-profile must be comma-separated integers: {err}") from err
            if not ranks or min(ranks) <= 0:
                raise ConfigError(f"rank-profile ranks must all be > 0, got {self.rank_profile!r}")
        self.aggregator_option_map  # noqa: B018 - parse now so a bad string fails fast
        self._check_causal_lm()
        self._check_privacy()
        self._check_optimizers()

    def _check_causal_lm(self) -> None:
        for name in ("eval_generate", "loss_chunk_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} must be >= 0, got {getattr(self, name)}")
        if self.eval_max_new_tokens <= 0:
            raise ConfigError(f"eval-max-new-tokens must be > 0, got {self.eval_max_new_tokens}")
        if self.task != "causal-lm":
            for name, off in (("eval_generate", 0), ("base_dtype", "fp32"), ("quantization", "none"),
                              ("compile", False), ("data_format", "auto")):
                if getattr(self, name) != off:
                    raise ConfigError(f"{_key(name)}={getattr(self, name)} is for task=causal-lm")
        if self.dp == "sample":
            for name, off in (("gradient_checkpointing", False), ("quantization", "none"),
                              ("compile", False)):
                if getattr(self, name) != off:
                    raise ConfigError(f"{_key(name)}={getattr(self, name)} does not work with "
                                      "dp=sample (opacus needs the plain model's per-sample hooks)")

    def _check_optimizers(self) -> None:
        if not (0.0 <= self.restricted_softmax <= 1.0 or self.restricted_softmax == -1.0):
            raise ConfigError(f"restricted-softmax must be in [0, 1] (1 = off) or -1 (auto), "
                              f"got {self.restricted_softmax}")
        if 0.0 <= self.restricted_softmax < 1.0 and (self.task != "classification" or self.dp == "sample"):
            raise ConfigError(f"restricted-softmax={self.restricted_softmax} is for task=classification "
                              "without dp=sample (which classes a node holds would change every "
                              "example's gradient, outside DP-SGD's per-example bound)")
        if self.lr_warmup_rounds < 0:
            raise ConfigError(f"lr-warmup-rounds must be >= 0, got {self.lr_warmup_rounds}")
        if self.lr_warmup_rounds >= self.num_server_rounds:
            raise ConfigError(f"lr-warmup-rounds={self.lr_warmup_rounds} must be below num-server-rounds="
                              f"{self.num_server_rounds} (the run would never train at learning-rate)")
        if self.server_learning_rate < 0:
            raise ConfigError(f"server-learning-rate must be >= 0 (0 = the optimizer's default), "
                              f"got {self.server_learning_rate}")
        for name in ("server_momentum", "server_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_key(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.server_tau <= 0:
            raise ConfigError(f"server-tau must be > 0, got {self.server_tau}")
        defaults = {f.name: f.default for f in fields(RunConfig)}
        uses = {"server_learning_rate": SERVER_OPTIMIZERS[1:], "server_momentum": SERVER_OPTIMIZERS[1:],
                "server_beta2": ("adam", "yogi"), "server_tau": ("adam", "yogi", "adagrad")}
        for name, optimizers in uses.items():
            if getattr(self, name) != defaults[name] and self.server_optimizer not in optimizers:
                raise ConfigError(f"{_key(name)}={getattr(self, name)} has no effect with server-optimizer="
                                  f"{self.server_optimizer}; it is for server-optimizer "
                                  f"{', '.join(optimizers[:-1])}{' or ' if optimizers[1:] else ''}"
                                  f"{optimizers[-1]}")

    def _check_privacy(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"target-epsilon must be > 0, got {self.target_epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier < 0 and self.noise_multiplier != -1.0:
            raise ConfigError(f"noise-multiplier must be >= 0 (or -1: solve it from target-epsilon), "
                              f"got {self.noise_multiplier}")
        if self.clip_norm <= 0:
            raise ConfigError(f"clip-norm must be > 0, got {self.clip_norm}")
        if self.dp == "sample" and self.max_grad_norm <= 0:
            raise ConfigError("max-grad-norm must be > 0 with dp=sample (it is the per-sample clipping norm)")
        if self.dp != "none" and self.noise_multiplier == -1.0 and math.isinf(self.target_epsilon):
            raise ConfigError("target-epsilon must be finite to solve noise-multiplier from it")
        if self.dp == "client-central" and self.norm_screen:
            raise ConfigError("norm-screen does not work with dp=client-central: clipping already bounds "
                              "each client, and drops that depend on the other clients' norms are outside "
                              "the accountant")


def parse_options(text: str, option: str) -> dict[str, Any]:
    """Parse a JSON object, or ``key=value,key=value`` split at top-level commas only.

    Values are JSON where they parse (``budgets=[2,6]``, ``top-k=2``), else strings, so a
    list or an object can be written without its commas splitting it.
    """
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{option}: not a JSON object ({err.msg} at character {err.pos})") from err
        if not isinstance(parsed, dict):
            raise ConfigError(f"{option}: expected a JSON object, got {text!r}")
        return parsed
    out: dict[str, Any] = {}
    for item in _top_level_split(text):
        if item.strip():
            out.update(parse_assignment(item.strip(), option))
    return out


def _top_level_split(text: str) -> list[str]:
    """Split at commas outside brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    return parts + ["".join(current)]


def parse_assignment(item: str, option: str) -> dict[str, Any]:
    """Parse one ``key=value`` (the value may contain commas); JSON where it parses."""
    if "=" not in item:
        raise ConfigError(f"{option}: expected key=value, got {item!r}")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        return {key: json.loads(raw)}
    except json.JSONDecodeError:
        return {key: raw}


_HOST_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(?P<port>[0-9]{1,5})")


def split_host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (an IPv6 host in brackets) as ``(host, port)``; ``None`` if it is not one."""
    match = _HOST_PORT.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        return None
    return match["host"].strip("[]"), int(match["port"])


def option_names() -> list[str]:
    """Every run-config key, hyphenated."""
    return [_key(f.name) for f in fields(RunConfig) if f.name != "extra"]


def option_help() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` of every run-config option, for ``pollinate options``."""
    rows = []
    for f in fields(RunConfig):
        if f.name == "extra":
            continue
        text = f.metadata["help"]
        if f.metadata["choices"]:
            text += f" ({' | '.join(f.metadata['choices'])})"
        rows.append((_key(f.name), str(f.type), json.dumps(f.default), text))
    return rows


def suggest(word: str, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest candidates (difflib), or ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _key(name: str) -> str:
    return name.replace("_", "-")


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}
_TUPLE = re.compile(r"^tuple\[(\w+), \.\.\.\]$")
LIST_SEPARATORS = re.compile(r"[:;/\s]+")
"""Between the items of a list option written as text (``0:5:10``): commas split ``aggregator-options``."""


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the option's type, refusing every lossy conversion (``3.5`` is no int).

    The one coercion routine of run-config and method option values (CLI strings, TOML
    and JSON values). ``tuple[int, ...]`` takes a list, one value or ``:``-separated text.
    """
    items = _TUPLE.match(str(annotation))
    if items:
        parts = list(value) if isinstance(value, list | tuple) else (
            [v for v in LIST_SEPARATORS.split(value.strip()) if v] if isinstance(value, str) else [value])
        return tuple(coerce(key, part, items.group(1)) for part in parts)
    kind = _KINDS.get(str(annotation), annotation if annotation in _KINDS.values() else None)
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be a boolean, got {value!r} ({key} must be true or false)")
    if kind is str:
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r}") from None
    if kind is int:
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(number)
    return float(number)
