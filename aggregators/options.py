"""Typed method options: one dataclass per method, parsed from ``aggregator-options``.

Like peft's ``LoraConfig``, a method declares each option as a dataclass field with its
type, default and ``metadata={"help": ...}`` (optionally ``"choices"``, or ``"parse"``
for a value with its own syntax). :func:`parse_options` turns the raw mapping into that
dataclass with :func:`pollinate.config.coerce`, the one coercion routine of run-config
values, so ``aggregator-options`` and ``--set`` refuse the same lossy conversions, and
every error names the method, the option and what is allowed. The same fields feed
``pollinate aggregators``.

A field ``foo_bar`` is option ``foo-bar`` (``foo_bar`` is accepted too); a trailing
underscore avoids a Python keyword (``lambda_`` is ``lambda``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, TypeVar

from pollinate.config import ConfigError, coerce, suggest

T = TypeVar("T", bound="MethodOptions")


@dataclass(frozen=True)
class MethodOptions:
    """The options every method receives; a method's own options subclass this."""

    seed: int = field(default=0, metadata={"help": "seed of the method's random draws "
                                                   "(default: the run's seed)"})

    @classmethod
    def from_options(cls: type[T], values: Mapping[str, Any], method: str = "aggregator-options") -> T:
        """``values`` (``aggregator-options`` keys) as this dataclass; unknown keys fail."""
        return parse_options(cls, values, method)


def option_key(name: str) -> str:
    """Field name -> option key: ``client_experts`` -> ``client-experts``, ``lambda_`` -> ``lambda``."""
    return name.rstrip("_").replace("_", "-")


def parse_options(cls: type[T], values: Mapping[str, Any], method: str, *, strict: bool = True) -> T:
    """``values`` coerced into ``cls``; unknown keys fail when ``strict``, else are left out."""
    known = {option_key(f.name): f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        spec = known.get(str(key).replace("_", "-"))
        if spec is None:
            if strict:
                raise ConfigError(f"{method}: unknown option {key!r}{suggest(str(key), known)} "
                                  f"(known: {', '.join(known)})")
            continue
        kwargs[spec.name] = _value(spec, value, f"{method}: {option_key(spec.name)}")
    return cls(**kwargs)


def _value(spec: Field, value: Any, label: str) -> Any:
    parse = spec.metadata.get("parse")
    parsed = parse(value, label) if parse else coerce(label, value, spec.type)
    choices = spec.metadata.get("choices", ())
    if choices and parsed not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(choices)}, got {parsed!r}"
                          f"{suggest(str(parsed), choices)}")
    return parsed


def describe(cls: type[MethodOptions]) -> list[tuple[str, str, str, str]]:
    """``(option, type, default, help)`` of every field, for ``pollinate aggregators``."""
    rows = []
    for f in fields(cls):
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" ({' | '.join(f.metadata['choices'])})"
        rows.append((option_key(f.name), str(f.type), json.dumps(f.default), text))
    return rows
