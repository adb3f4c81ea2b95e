"""``ubsmoe flower run``: start a run of the experiment on a Flower deployment (a SuperLink and one
SuperNode per client, started beforehand; see the README's "Running on several machines").

The Flower app (``APP_PYPROJECT``, also in the repository as deploy/flower/pyproject.toml) holds no
code: its components are ubsmoe's, installed on every machine. The connection to the SuperLink is
written to a temporary FLWR_HOME for the command only, so the user's Flower configuration is left
as it is; `flwr run` streams the server's log until the run ends.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from ubsmoe.config import ConfigError

APP_PYPROJECT = """\
# The Flower app of a ubsmoe deployment. ubsmoe (with its flower extra) is installed on the SuperLink's
# and every SuperNode's machine, so the app holds no code of its own: its components are ubsmoe's.
# Start runs with `ubsmoe flower run` (or `flwr run deploy/flower CONNECTION --run-config '...'`);
# connections live in $FLWR_HOME/config.toml, never here (`flwr run` rewrites a pyproject.toml that
# holds [tool.flwr.federations]).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "ubsmoe-flower"
version = "0.1.0"
description = "ubsmoe's federated fine-tuning on a Flower deployment"
dependencies = []

[tool.flwr.app]
publisher = "ubsmoe"

[tool.flwr.app.components]
serverapp = "ubsmoe.engine.flower.server_app:app"
clientapp = "ubsmoe.engine.flower.client_app:app"

[tool.flwr.app.config]
config = ""          # the experiment's TOML file (absolute path); empty: the defaults
overrides = ""       # key=value settings, separated by spaces
out = ""             # the results folder (absolute path)
force = false        # replace a finished run in out
node-wait-s = 300.0  # how long to wait for one SuperNode per client
round-timeout-s = 86400.0  # how long a round waits for its clients' replies
"""


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def run_deployment(superlink: str, out: Path, config_path: str | None, overrides: list[str],
                   root_certificates: Path | None, insecure: bool, force: bool = False,
                   round_timeout_s: float = 86400.0, node_wait_s: float = 300.0) -> None:
    """Submit the run to the SuperLink at ``superlink`` (HOST:PORT) and wait for it to end; the server
    writes ``out/results.json`` on its machine (``out`` is a path there)."""
    if insecure == (root_certificates is not None):
        raise ConfigError("give either --root-certificates CA.crt (TLS, the SuperLink's CA) or --insecure")
    if root_certificates is not None and not root_certificates.is_file():
        raise ConfigError(f"--root-certificates {root_certificates} is not a file")
    flwr = Path(sys.executable).parent / "flwr"
    run_config = " ".join([
        f"config={_toml_string(str(Path(config_path).resolve()) if config_path else '')}",
        f"overrides={_toml_string(shlex.join(overrides))}",
        f"out={_toml_string(str(out))}",
        f"force={'true' if force else 'false'}",
        f"node-wait-s={float(node_wait_s)}",
        f"round-timeout-s={float(round_timeout_s)}",
    ])
    with tempfile.TemporaryDirectory(prefix="ubsmoe-flwr-") as home:
        connection = [f"address = {_toml_string(superlink)}"]
        connection.append(f"root-certificates = {_toml_string(str(root_certificates.resolve()))}" if root_certificates
                          else "insecure = true")
        Path(home, "config.toml").write_text('[superlink]\ndefault = "ubsmoe"\n\n[superlink.ubsmoe]\n'
                                             + "\n".join(connection) + "\n")
        app = write_app(Path(home) / "app")
        env = os.environ | {"FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        finished = subprocess.run([str(flwr), "run", str(app), "ubsmoe", "--run-config", run_config, "--stream"],
                                  env=env, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"flwr run ended with exit code {finished.returncode} (its log is above)")
