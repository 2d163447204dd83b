"""Run configuration: one validated, typed record shared by server, clients and the CLI.

Flower hands apps a flat ``UserConfig`` mapping with hyphenated keys (from
``[tool.flwr.app.config]``, ``--run-config`` or our own launcher). Everything that
reads configuration goes through :class:`RunConfig` so that a typo or an impossible
value fails fast with a message naming the option, on the server, before any round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration option is unknown, of the wrong type or out of range."""


TASKS = ("classification", "causal-lm")
PARTITIONS = ("iid", "dirichlet", "classes")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
DP_MODES = ("none", "sample", "client-central", "client-local")


@dataclass(frozen=True)
class RunConfig:
    """Every option of a Pollinate run; field ``foo_bar`` is run-config key ``foo-bar``."""

    # federation
    num_server_rounds: int = 5
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    round_timeout: float = 600.0
    # task, model and data
    task: str = "classification"
    model: str = ""
    train_data: str = ""
    test_data: str = ""
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    num_clients: int = 10
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    max_train_examples: int = 0
    test_examples: int = 500
    max_length: int = 64
    # adapter
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "auto"
    rank_profile: str = ""
    # aggregation
    aggregator: str = "fedit"
    aggregator_options: str = ""
    # local training
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    learning_rate: float = 3e-3
    optimizer: str = "adamw"  # sgd: momentum 0.9; DP-SGD's choice for short rounds (docs/privacy.md)
    max_grad_norm: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    # differential privacy (docs/privacy.md); max-grad-norm is the per-sample clip of dp=sample
    dp: str = "none"
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = -1.0
    clip_norm: float = 1.0
    # wire format
    codec: str = "topk-int8"
    density: float = 0.1
    error_feedback: bool = True
    downlink_codec: str = "topk-ternary"
    downlink_density: float = 0.1
    max_payload_bytes: int = 64 * 1024 * 1024
    keep_versions: int = 8
    # outputs
    out: str = "runs/latest"
    resume: bool = True
    num_labels: int = 0
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
                    raise ConfigError(f"unknown option {key!r}")
                extra[key.replace("_", "-")] = value
                continue
            kwargs[name] = _coerce(key, value, known[name].type)
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
                        "max_grad_norm", "lora_dropout", "min_train_nodes")
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
        for name, allowed in (("task", TASKS), ("partition", PARTITIONS), ("precision", PRECISIONS),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_key(name)} must be one of {allowed}, got {getattr(self, name)!r}")
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
        self._check_privacy()

    def _check_privacy(self) -> None:
        if self.dp not in DP_MODES:
            raise ConfigError(f"dp must be one of {DP_MODES}, got {self.dp!r}")
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


def parse_options(text: str, option: str) -> dict[str, Any]:
    """Parse ``key=value,key=value``; values are JSON where they parse, else strings."""
    out: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")):
        if item:
            out.update(parse_assignment(item, option))
    return out


def parse_assignment(item: str, option: str) -> dict[str, Any]:
    """Parse one ``key=value`` (the value may contain commas); JSON where it parses."""
    if "=" not in item:
        raise ConfigError(f"{option}: expected key=value, got {item!r}")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        return {key: json.loads(raw)}
    except json.JSONDecodeError:
        return {key: raw}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(annotation), None)
    if kind is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return kind(float(value)) if kind is int and isinstance(value, str) else kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r}") from err
