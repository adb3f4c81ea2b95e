"""The Flower ClientApp: each training message is a ``TrainInstruction``; the app runs
``engine.client_round.run_client`` on it and replies with the ``ClientUpdate``.

The model is built from the run's config, which travels with every message, once per process and
config: a simulation's worker process keeps it between rounds; a deployment's process per message
reads the upcycled experts and routers from the node's cache (``cache-dir`` in the node config). A node that knows its partition
(``partition-id`` in its node config) refuses an instruction meant for another one.

Deployment: ``ubsmoe.engine.flower.client_app:app``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from ubsmoe.config import config_from_dict
from ubsmoe.engine.client_round import ClientRuntime, run_client
from ubsmoe.engine.errors import ClientFault
from ubsmoe.engine.flower.messages import CLIENT_FAULT, NODE_MISCONFIGURED, read_instruction, update_content
from ubsmoe.metrics.flops import FlopCounter

PARTITION, BUDGET, CACHE_DIR = "partition-id", "budget", "cache-dir"
_RUNTIMES: dict[str, ClientRuntime] = {}  # config digest -> this process's runtime (one at a time)


def runtime_for(config_text: str, upcycle_cache: Path | None = None) -> ClientRuntime:
    """This process's client runtime for the config (built on first use, then kept; the upcycled experts
    and routers read from ``upcycle_cache`` when an earlier process of the node left them there)."""
    # imported on the first training message, not with the app: a node answers the server's first query (its
    # partition id) without loading the model's stack
    from ubsmoe.engine.experiment import build_experiment

    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # never two models in one process
        exp = build_experiment(config_from_dict(json.loads(config_text)), upcycle_cache=upcycle_cache)
        _RUNTIMES[key] = exp.client_runtime(FlopCounter(exp.model))
    return _RUNTIMES[key]


def upcycle_cache(context: Context) -> Path:
    """The node's folder for upcycled backbones: ``cache-dir`` in its node config, else $UBSMOE_UPCYCLE_CACHE,
    else one in the temporary folder. A deployment starts a ClientApp process per message; this spares
    each the upcycling."""
    folder = context.node_config.get(CACHE_DIR) or os.environ.get("UBSMOE_UPCYCLE_CACHE")
    return Path(str(folder)) if folder else Path(tempfile.gettempdir()) / "ubsmoe-upcycle-cache"


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        instruction, config_text = read_instruction(msg.content)
        partition = context.node_config.get(PARTITION)
        if partition is not None and int(partition) != instruction.client.client_id:
            reason = f"this node holds partition {partition}, not the instruction's client {instruction.client.client_id}"
            return Message(Error(code=NODE_MISCONFIGURED, reason=reason), reply_to=msg)
        update = run_client(runtime_for(config_text, upcycle_cache(context)), instruction)
    except ClientFault as fault:  # did not deliver: the server leaves this client out of the round
        return Message(Error(code=CLIENT_FAULT, reason=str(fault)), reply_to=msg)
    except Exception:  # a bug: the server stops the run with this traceback (federation.on_client_error)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc()), reply_to=msg)
    return Message(update_content(update), reply_to=msg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """The node's partition id and, if given, its budget, from its node config (the server maps clients to
    nodes by the first and checks the second against the config's)."""
    if PARTITION not in context.node_config:
        reason = f"start the SuperNode with --node-config '{PARTITION}=<client id>'"
        return Message(Error(code=NODE_MISCONFIGURED, reason=reason), reply_to=msg)
    node = {PARTITION: int(context.node_config[PARTITION])}
    if BUDGET in context.node_config:
        node[BUDGET] = float(context.node_config[BUDGET])
    return Message(RecordDict({"node": ConfigRecord(node)}), reply_to=msg)
