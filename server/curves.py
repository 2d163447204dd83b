"""What a run cost to get where it got: cumulative seconds and bytes per client, time-to-target.

Final accuracy alone hides a compression or an optimizer that costs rounds. Every round in
summary.json carries the cumulative wall seconds and the cumulative bytes a sampled client
sent and received so far; with ``target-accuracy`` set the summary names the first round
that reached it and what it cost (rounds, seconds, bytes up and down per client).
"""

from __future__ import annotations

from typing import Any


def cumulative(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rounds`` with ``cum_seconds``, ``cum_bytes_up_per_client`` and ``cum_bytes_down_per_client``."""
    seconds = up = down = 0.0
    out = []
    for r in rounds:
        sampled = max(r.get("sampled", 0), 1)
        seconds += r.get("seconds", 0.0)
        up += r.get("bytes_up", 0) / sampled
        down += r.get("bytes_down", 0) / sampled
        out.append({**r, "cum_seconds": seconds, "cum_bytes_up_per_client": round(up),
                    "cum_bytes_down_per_client": round(down)})
    return out


def to_target(rounds: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Rounds, seconds and bytes per client until accuracy first reached ``target`` (None: never)."""
    for r in rounds:
        if r.get("accuracy", -1.0) >= target:
            return {"target_accuracy": target, "rounds": r["round"], "seconds": r["cum_seconds"],
                    "bytes_up_per_client": r["cum_bytes_up_per_client"],
                    "bytes_down_per_client": r["cum_bytes_down_per_client"]}
    return None
