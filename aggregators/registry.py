"""Find an aggregator by name: built-ins, ``package.module:Class`` paths, or entry points.

Server and client resolve the same name the same way, so the client half of a method
is always the one that belongs to the server half the run uses.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from importlib.metadata import entry_points

from pollinate.aggregators.base import Aggregator

ENTRY_POINT_GROUP = "pollinate.aggregators"

BUILTINS: dict[str, str] = {
    "fedit": "pollinate.aggregators.fedit:FedIT",
    "ffa": "pollinate.aggregators.ffa:FFA",
    "flora": "pollinate.aggregators.flora:FLoRA",
    "hetlora": "pollinate.aggregators.hetlora:HetLoRA",
    "flexlora": "pollinate.aggregators.flexlora:FlexLoRA",
    "selective-layer": "pollinate.aggregators.selective_layer:SelectiveLayer",
    "expert-routing": "pollinate.aggregators.expert_routing:ExpertRouting",
}


class UnknownAggregator(LookupError):
    """No built-in, importable path or entry point has this name."""


def available() -> list[str]:
    """Names that resolve: installed built-ins plus entry points."""
    names = [n for n, path in BUILTINS.items() if _module_exists(path.split(":")[0])]
    names += [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return sorted(set(names))


def methods(paths: Sequence[str] = ()) -> dict[str, type[Aggregator]]:
    """Every available method by name, plus the ``module:Class`` ``paths`` (``pollinate aggregators``)."""
    return {name: resolve(name) for name in [*available(), *paths]}


def resolve(name: str) -> type[Aggregator]:
    """``fedit`` (built-in), ``mypkg.mod:MyAggregator`` (dotted path) or an entry-point name."""
    if name in BUILTINS:
        return _load(BUILTINS[name], name)
    if ":" in name:
        return _load(name, name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _check(ep.load(), name)
    raise UnknownAggregator(
        f"unknown aggregator {name!r}; known: {', '.join(available())} "
        "(or give a path such as 'mypkg.module:MyAggregator')")


def _load(path: str, name: str) -> type[Aggregator]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownAggregator(f"aggregator {name!r}: cannot import {module_name!r} ({err})") from err
    if not hasattr(module, attr):
        raise UnknownAggregator(f"aggregator {name!r}: {module_name!r} has no {attr!r}")
    return _check(getattr(module, attr), name)


def _check(obj: object, name: str) -> type[Aggregator]:
    if not (isinstance(obj, type) and issubclass(obj, Aggregator)):
        raise UnknownAggregator(f"aggregator {name!r} is not a subclass of pollinate.aggregators.Aggregator")
    return obj


def _module_exists(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None
