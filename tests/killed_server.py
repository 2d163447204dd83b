"""A server that dies between rounds, for resume tests: Flower's grid until a round limit."""

from __future__ import annotations


class ServerKilled(RuntimeError):
    """The server process died (emulated)."""


class KilledGrid:
    """Flower's grid, except that the server dies when round ``rounds + 1`` sends its messages."""

    def __init__(self, inner, rounds: int):  # noqa: ANN001 - Flower's Grid
        self.inner, self.rounds = inner, rounds

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        self.rounds -= 1
        if self.rounds < 0:
            raise ServerKilled("server killed before the round")
        return self.inner.send_and_receive(messages, timeout=timeout)
