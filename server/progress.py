"""A rich live view of the rounds: a progress bar and one line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RoundDisplay:
    def __init__(self, total: int, done: int = 0, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.task = self.progress.add_task("rounds", total=total, completed=done)

    def __enter__(self) -> RoundDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, record: dict[str, Any]) -> None:
        if "accuracy" in record:
            quality = f"accuracy {record['accuracy']:.3f}  loss {record['loss']:.4f}"
        elif "loss" in record:
            quality = f"perplexity {record.get('perplexity', float('nan')):.2f}  loss {record['loss']:.4f}"
            if "exact_match" in record:
                quality += f"  exact match {record['exact_match']:.3f}  token F1 {record['token_f1']:.3f}"
        else:
            quality = "not evaluated"
        dropped = f"  [yellow]dropped {len(record['dropped'])}[/]" if record.get("dropped") else ""
        epsilon = f"  epsilon {record['epsilon']:.2f}" if record.get("epsilon") is not None else ""
        self.progress.console.print(
            f"round {record['round']:>3}  {quality}  "
            f"up {record['bytes_up']:,} B  down {record['bytes_down']:,} B  "
            f"clients {record.get('clients', 0)}{epsilon}{dropped}", soft_wrap=True)
        if record["round"] > 0:
            self.progress.advance(self.task)

    def fail(self, rnd: int, reasons: str) -> None:
        """A round that aggregated no update: say so, with the clients' reasons."""
        self.progress.console.print(f"[red]round {rnd}: no update could be aggregated[/] ({reasons})",
                                    soft_wrap=True, markup=True, highlight=False)
