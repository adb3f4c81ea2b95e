"""The Flower ServerApp of a deployment (``ubsmoe.engine.flower.server_app:app``): SuperNodes started with
``--node-config "partition-id=<client id>"`` (and optionally ``budget=<beta>``), runs started with
``ubsmoe flower run`` (or ``flwr run deploy/flower``).

The run config (``[tool.flwr.app.config]`` of deploy/flower/pyproject.toml, overridden by ``flwr run
--run-config``) names the experiment: ``config`` (a TOML file, absolute path), ``overrides`` (``key=value``
settings separated by spaces), ``out`` (the results folder, absolute path) and ``force``. The server
writes ``out/results.json``, each round's checkpoint and history and the final model (``out/model``) as
``ubsmoe run`` does. A round waits ``federation.client_timeout`` seconds for its clients if the config
sets it, else the run config's ``round-timeout-s``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ubsmoe.config import ConfigError, config_from_dict, load_config
from ubsmoe.engine.checkpoint import read_checkpoint
from ubsmoe.engine.flower.messages import global_arrays
from ubsmoe.engine.flower.strategy import MethodStrategy
from ubsmoe.engine.run_folder import check_output_folder
from ubsmoe.engine.server import Server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    config_file = str(settings.get("config", "")) or None
    overrides = shlex.split(str(settings.get("overrides", "")))
    out = Path(str(settings.get("out", "runs/flower")))
    checkpoint = None
    if bool(settings.get("resume", False)):  # continue the run in out from its last checkpoint
        if (out / "results.json").is_file():
            raise ConfigError(f"{out} holds a finished run (results.json): nothing to resume")
        checkpoint = read_checkpoint(out)
        config = load_config(config_file, overrides, base=config_from_dict(checkpoint.config))
    else:
        config = load_config(config_file, overrides)
        check_output_folder(out, force=bool(settings.get("force", False)))
    server = Server(config, out=out)
    first = server.start(checkpoint)
    timeout = config.federation.client_timeout or float(settings.get("round-timeout-s", 24 * 3600))
    strategy = MethodStrategy(server, node_wait_s=float(settings.get("node-wait-s", 300)), round_timeout_s=timeout,
                              rounds_done=first - 1)
    if first <= config.federation.rounds:
        strategy.start(grid, global_arrays(server.state.params), num_rounds=config.federation.rounds - first + 1,
                       timeout=timeout, evaluate_fn=strategy.evaluate)
    server.finish("flower")
