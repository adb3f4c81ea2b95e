"""``ubsmoe run --engine flower-sim``: Flower's simulation (Ray) with the same config, the same server
and client code, and the same results.json as the in-process engine.

The ServerApp runs in this process; every client is a Flower SuperNode whose ClientApp runs in a Ray
worker process (``federation.num_clients`` nodes, each worker using ``threads`` CPU threads, as many
workers at once as the CPUs allow).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from ubsmoe.config import ExperimentConfig
from ubsmoe.engine.checkpoint import Checkpoint
from ubsmoe.engine.errors import RunInterrupted
from ubsmoe.engine.run_records import RunResults


def run_flower_simulation(config: ExperimentConfig, show_progress: bool = True, timeout_s: float = 24 * 3600,
                          out: Path | None = None, resume: Checkpoint | None = None, variant: str | None = None
                          ) -> RunResults:
    """Run every round on Flower's simulation engine and return the results. A round waits
    ``federation.client_timeout`` seconds for its clients if set, else ``timeout_s``. With ``out``, the
    checkpoint and history after every round and, at the end, the final model, results.json and summary.md go
    there, as ``run_experiment`` writes them;
    ``resume`` continues from a checkpoint (Flower counts the remaining rounds from 1, the strategy adds
    the rounds done)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from ubsmoe.engine.flower import client_app
    from ubsmoe.engine.flower.messages import global_arrays
    from ubsmoe.engine.flower.strategy import MethodStrategy
    from ubsmoe.engine.server import Server

    server = Server(config, out=out)
    first = server.start(resume)
    timeout_s = config.federation.client_timeout or timeout_s
    bar = tqdm(total=config.federation.rounds, initial=first - 1, desc=f"{server.method.name} rounds (flower-sim)",
               unit="round", disable=not show_progress)
    strategy = MethodStrategy(server, progress=bar, round_timeout_s=timeout_s, rounds_done=first - 1)
    app = ServerApp()

    stopped: list[BaseException] = []  # what ended the ServerApp early (Flower logs it and goes on)

    @app.main()
    def main(grid, context) -> None:
        try:
            strategy.start(grid, global_arrays(server.state.params), num_rounds=config.federation.rounds - first + 1,
                           timeout=timeout_s, evaluate_fn=strategy.evaluate)
        except BaseException as error:
            stopped.append(error)
            raise

    flwr_log = logging.getLogger("flwr")  # Flower's round-by-round log: results.json holds what it says
    flwr_log.setLevel(logging.ERROR)
    flwr_log.propagate = False
    cpus = os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": min(config.threads, cpus), "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "logging_level": "ERROR", "log_to_driver": True,
                             "object_store_memory": 512 * 2**20}}
    try:
        if first <= config.federation.rounds:  # a checkpoint of the last round leaves only the model to save
            try:
                run_simulation(server_app=app, client_app=client_app.app,
                               num_supernodes=config.federation.num_clients, backend_config=backend)
            except KeyboardInterrupt:
                raise RunInterrupted(len(server.history) + 1, server.checkpoint_round) from None
    finally:
        bar.close()
    if stopped:  # the run ends here with the ServerApp's own error (a client's bug, too few clients, ...)
        raise stopped[0]
    if len(server.history) != config.federation.rounds:
        raise RuntimeError(f"the Flower simulation ended after {len(server.history)} of "
                           f"{config.federation.rounds} rounds (see its log above)")
    return server.finish("flower-sim", variant)
