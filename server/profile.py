"""Where a round's wall time goes: laps of one clock, summed per component.

Always on, so it costs next to nothing: a lap is one ``perf_counter`` call and a dict
add. The time the server waits on ``send_and_receive`` is split with what each client
reports about itself (``client-started``, a wall-clock time, and ``client-seconds`` /
``train-seconds``, durations): the part of the wait in which at least one client was
computing is shared between local training (``train``) and the clients' other work
(``client_other``: decoding the downlink, model and data setup, encoding the update) in
proportion to their summed times; the rest, in which no client computed, is message
handling and transport (Flower, Ray or gRPC: ``transport``). Client clocks compare with
the server's on one machine (simulation); in a deployment the client intervals are
clipped to the wait, so the split there is approximate, and a client could skew it (never
anything else: these metrics feed only the profile).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

COMPONENTS = ("downlink", "transport", "client_other", "train", "validate", "aggregate", "evaluate",
              "checkpoint", "other")
WORK = frozenset({"train", "evaluate"})  # what a round is for; every other component is overhead
STARTED, TOTAL, TRAIN = "client-started", "client-seconds", "train-seconds"  # client metrics


class RoundClock:
    """Seconds per component of one round; ``other`` is whatever no lap named."""

    def __init__(self) -> None:
        self.started = self._mark = time.perf_counter()
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)
        self.window = (0.0, 0.0)  # wall-clock start and end of the wait on the clients

    def lap(self, component: str) -> None:
        """Charge the time since the previous lap (or the start) to ``component``."""
        now = time.perf_counter()
        self.seconds[component] += now - self._mark
        self._mark = now

    def split_clients(self, clients: Iterable[Mapping[str, Any]]) -> None:
        """Move the part of ``transport`` in which clients computed to ``train`` / ``client_other``."""
        start, end = self.window
        spans, total, train = [], 0.0, 0.0
        for c in clients:
            if not (isinstance(c.get(STARTED), float | int) and isinstance(c.get(TOTAL), float | int)):
                continue
            seconds = max(float(c[TOTAL]), 0.0)
            spans.append((max(float(c[STARTED]), start), min(float(c[STARTED]) + seconds, end)))
            total += seconds
            train += min(max(float(c.get(TRAIN, 0.0)), 0.0), seconds)
        busy = min(_union(spans), self.seconds["transport"])
        share = train / total if total > 0 else 0.0
        self.seconds["train"] += busy * share
        self.seconds["client_other"] += busy * (1 - share)
        self.seconds["transport"] -= busy

    def finish(self) -> tuple[float, dict[str, float]]:
        """The round's wall time so far and its components, which add up to it."""
        wall = time.perf_counter() - self.started
        named = sum(v for k, v in self.seconds.items() if k != "other")
        self.seconds["other"] = max(wall - named, 0.0)  # the laps lie inside the wall time: rounding only
        return wall, dict(self.seconds)


def _union(spans: Sequence[tuple[float, float]]) -> float:
    """Total length covered by the intervals (empty ones count nothing)."""
    covered, reach = 0.0, float("-inf")
    for lo, hi in sorted(s for s in spans if s[1] > s[0]):
        if hi > reach:
            covered += hi - max(lo, reach)
            reach = hi
    return covered


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean seconds per round and share of the summed round wall time, per component.

    ``records`` are metrics.jsonl lines; those without a ``profile`` (round 0) are skipped.
    The last row, ``overhead``, is every component outside local training and evaluation.
    """
    profiled = [r for r in records if r.get("profile")]
    wall = sum(r["seconds"] for r in profiled)
    if not profiled or wall <= 0:
        return []
    sums = {k: sum(r["profile"].get(k, 0.0) for r in profiled) for k in COMPONENTS}
    rows = [{"component": k, "seconds": sums[k] / len(profiled), "share": sums[k] / wall}
            for k in COMPONENTS]
    overhead = sum(v for k, v in sums.items() if k not in WORK)
    return rows + [{"component": "overhead", "seconds": overhead / len(profiled), "share": overhead / wall}]
