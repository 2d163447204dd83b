"""Aggregation methods: the interface, the registry and one module per method."""

from pollinate.aggregators.base import AggregationError, Aggregator, ClientPart, ClientUpdate
from pollinate.aggregators.registry import UnknownAggregator, available, methods, resolve

__all__ = ["AggregationError", "Aggregator", "ClientPart", "ClientUpdate", "UnknownAggregator",
           "available", "methods", "resolve"]
