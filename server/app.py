"""The Pollinate ServerApp (Flower Message API): read the run config, run the rounds.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]``); it takes its
options from the run config. :func:`make_app` builds the same app around a given
config, for the in-process simulation engine, which does not read pyproject.

Whatever stops a run is written to the run directory before it propagates: one line
in ``error.txt`` (what the CLI prints) and the full traceback in ``server.log``.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import ConfigError, RunConfig

from .loop import Coordinator
from .rundir import fresh_path

log = logging.getLogger("pollinate.server")
ERROR_FILE, LOG_FILE = "error.txt", "server.log"


class RunFailed(RuntimeError):
    """The run ended without aggregating any update, or stopped on an error."""


def make_app(config: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or RunConfig.from_mapping(dict(context.run_config))
        if not run_config.out:
            run_config = run_config.replace(out=str(fresh_path(tag=f"run{context.run_id}")))
        run(run_config, grid, context.run_id)

    return app


def run(config: RunConfig, grid: Grid, run_id: int) -> dict:
    """Run the rounds; a failure leaves its one-line reason and traceback in the run directory."""
    out = Path(config.out).resolve()
    log.warning("run directory: %s", out)
    handler: logging.Handler | None = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).unlink(missing_ok=True)
        handler = logging.FileHandler(out / LOG_FILE, mode="a" if config.resume else "w")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pollinate").addHandler(handler)
    except OSError:
        handler = None  # an unwritable --out is reported by the Coordinator with its reason
    try:
        summary = Coordinator(config, grid, run_id=run_id).run()
        if summary["status"] != "ok":
            raise RunFailed("no round aggregated an update; the clients' reasons are in "
                            f"{out / 'metrics.jsonl'}")
        return summary
    except Exception as err:
        log.error("run failed: %s", err)
        if handler is not None:
            handler.stream.write(traceback.format_exc())
            (out / ERROR_FILE).write_text(one_line(err) + "\n")
        raise
    finally:
        if handler is not None:
            logging.getLogger("pollinate").removeHandler(handler)
            handler.close()


def one_line(err: BaseException) -> str:
    """What to tell a user: the message of a configuration or run error, else type and message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ConfigError, RunFailed)) else f"{type(err).__name__}: {text}"


app = make_app()
