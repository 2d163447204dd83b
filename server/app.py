"""The Pollinate ServerApp (Flower Message API): read the run config, run the rounds.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components]``); it takes its
options from the run config. :func:`make_app` builds the same app around a given
config, for the in-process simulation engine, which does not read pyproject.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import RunConfig

from .loop import Coordinator


def make_app(config: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = config or RunConfig.from_mapping(dict(context.run_config))
        Coordinator(run_config, grid, run_id=context.run_id).run()

    return app


app = make_app()
