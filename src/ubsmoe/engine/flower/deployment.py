"""``ubsmoe flower run``: start a run of the experiment on a Flower deployment (a SuperLink and one
SuperNode per client, started beforehand; see the README's "Running on several machines").

The Flower app (``APP_PYPROJECT``, also in the repository as deploy/flower/pyproject.toml) holds no
code: its components are ubsmoe's, installed on every machine. The connection to the SuperLink is
written to a temporary FLWR_HOME for the command only, so the user's Flower configuration is left
as it is. What the user can get wrong is checked before Flower is called: the address (HOST:PORT),
the CA certificate (PEM) and that something answers there. `flwr run --format json` then submits
the run, and a submission the SuperLink does not take is the user's error too (TLS settings that do
not match the SuperLink's); `flwr log --stream` shows the server's log until the run ends, and a
failure from then on is not the user's.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ubsmoe.config import ConfigError, MissingPackageError

DEFAULT_PORT = 8000  # flower-superlink --port: in Flower 1.41 the SuperNodes and `flwr` reach it there
CONNECT_TIMEOUT_S = 5.0
UNAVAILABLE = "Connection to the SuperLink is unavailable"  # Flower's message when a request gets no answer

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
resume = false       # continue the run in out from its last checkpoint
node-wait-s = 300.0  # how long to wait for one SuperNode per client
round-timeout-s = 86400.0  # how long a round waits for its clients' replies
"""


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def _address(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def superlink_address(superlink: str) -> tuple[str, int]:
    """HOST and PORT of ``--superlink`` (an IPv6 address in brackets: ``[::1]:8000``), or a user error
    naming what is missing."""
    text = superlink.strip()
    if "://" in text:
        raise ConfigError(f"--superlink {superlink}: give HOST:PORT without a scheme, "
                          f"e.g. --superlink {text.split('://', 1)[1]}")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"--superlink {superlink} is not HOST:PORT (an IPv6 address in brackets: "
                              f"[::1]:{DEFAULT_PORT})")
        port = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ConfigError(f"--superlink {superlink}: write an IPv6 address in brackets, [ADDRESS]:PORT, "
                          f"e.g. [::1]:{DEFAULT_PORT}")
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ConfigError(f"--superlink {superlink} has no host: give HOST:PORT, "
                          f"e.g. --superlink server.example:{DEFAULT_PORT}")
    if not port:
        raise ConfigError(f"--superlink {superlink} has no port: give HOST:PORT with the port the SuperLink listens "
                          f"on (flower-superlink --port, {DEFAULT_PORT} by default), "
                          f"e.g. --superlink {_address(host, DEFAULT_PORT)}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"--superlink {superlink}: the port {port!r} is not a number from 1 to 65535; give the port "
                          f"the SuperLink listens on (flower-superlink --port, {DEFAULT_PORT} by default)")
    return host, int(port)


def check_root_certificates(path: Path) -> None:
    """A user error unless ``path`` holds a PEM certificate (what Flower's TLS client loads as its CA)."""
    from cryptography import x509

    if not path.is_file():
        raise ConfigError(f"--root-certificates {path} is not a file: give the CA certificate (ca.crt) written by "
                          "`ubsmoe flower certificates`")
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as err:
        raise ConfigError(f"--root-certificates {path} cannot be read ({err.strerror or err})") from None
    except ValueError:
        raise ConfigError(f"--root-certificates {path} is not a PEM certificate: give the CA certificate (ca.crt) "
                          "written by `ubsmoe flower certificates`, the one the SuperLink's certificate is signed "
                          "by") from None


def check_reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A user error unless a TCP connection to HOST:PORT opens within ``timeout_s``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror:
        reason = f"the host name {host} is not known"
    except ConnectionRefusedError:
        reason = "connection refused"
    except TimeoutError:
        reason = f"no answer within {timeout_s:g} s"
    except OSError as err:
        reason = err.strerror or str(err)
    raise ConfigError(f"no SuperLink answers at {_address(host, port)} ({reason}): start it there "
                      f"(flower-superlink ... --port {port}) or give its address, --superlink HOST:PORT")


def flwr_executable() -> Path:
    """The `flwr` command of the Python running ubsmoe (beside it, so its Flower is the one ubsmoe
    imports), else the one on PATH; a user error when there is none."""
    beside = Path(sys.executable).parent / ("flwr.exe" if os.name == "nt" else "flwr")
    if beside.is_file():
        return beside
    found = shutil.which("flwr")
    if found:
        return Path(found)
    raise MissingPackageError("the `flwr` command is not installed (neither beside this Python nor on PATH): "
                              "pip install 'ubsmoe[flower]' (flwr[simulation]==1.41.0); `make install` installs it")


def _submitted_run(finished: subprocess.CompletedProcess, where: str, tls: str) -> int:
    """The run id from the JSON of `flwr run --format json`; a user error when what answered on TCP
    at ``where`` just before could not be asked (TLS settings that do not match) or is no SuperLink,
    a RuntimeError for anything else."""
    try:
        answer = json.loads(finished.stdout[finished.stdout.index("{"):])
    except ValueError:
        answer = None
    if finished.returncode != 0 or not isinstance(answer, dict):
        sys.stderr.write(finished.stdout + finished.stderr)
        raise RuntimeError(f"flwr run ended with exit code {finished.returncode} (its output is above)")
    if answer.get("success") and answer.get("run-id") is not None:
        if answer.get("note"):
            print(f"note from the SuperLink: {answer['note']}")
        return int(answer["run-id"])
    message = str(answer.get("error-message", ""))
    if UNAVAILABLE in message:
        raise ConfigError(f"{where} accepts connections, but `flwr run` could not submit the run there (Flower: the "
                          f"connection to the SuperLink is unavailable): check that it is the SuperLink's address and "
                          f"that {tls}")
    if "404 Not Found" in message and "/v1/control/" in message:
        raise ConfigError(f"what answers at {where} is not a SuperLink (404 Not Found for Flower's control API): "
                          "give the SuperLink's address, --superlink HOST:PORT with its --port")
    sys.stderr.write(message + "\n")
    raise RuntimeError("flwr run did not start the run (its message is above)")


def run_deployment(superlink: str, out: Path, config_path: str | None, overrides: list[str],
                   root_certificates: Path | None, insecure: bool, force: bool = False,
                   round_timeout_s: float = 86400.0, node_wait_s: float = 300.0, resume: bool = False) -> None:
    """Submit the run to the SuperLink at ``superlink`` (HOST:PORT) and wait for it to end; the server
    writes ``out/results.json`` on its machine (``out`` is a path there)."""
    if insecure == (root_certificates is not None):
        raise ConfigError("give either --root-certificates CA.crt (TLS, the SuperLink's CA) or --insecure")
    host, port = superlink_address(superlink)
    if root_certificates is not None:
        check_root_certificates(root_certificates)
    flwr = flwr_executable()
    check_reachable(host, port)
    where = _address(host, port)
    tls = ("the SuperLink was started with --insecure (else give --root-certificates with its CA certificate)"
           if insecure else
           f"the SuperLink runs with TLS (not --insecure) on a certificate that {root_certificates} signed and that "
           f"names {host} (`ubsmoe flower certificates --host {host}`)")
    run_config = " ".join([
        f"config={_toml_string(str(Path(config_path).resolve()) if config_path else '')}",
        f"overrides={_toml_string(shlex.join(overrides))}",
        f"out={_toml_string(str(out))}",
        f"force={'true' if force else 'false'}",
        f"resume={'true' if resume else 'false'}",
        f"node-wait-s={float(node_wait_s)}",
        f"round-timeout-s={float(round_timeout_s)}",
    ])
    with tempfile.TemporaryDirectory(prefix="ubsmoe-flwr-") as home:
        connection = [f"address = {_toml_string(where)}"]
        connection.append(f"root-certificates = {_toml_string(str(root_certificates.resolve()))}" if root_certificates
                          else "insecure = true")
        Path(home, "config.toml").write_text('[superlink]\ndefault = "ubsmoe"\n\n[superlink.ubsmoe]\n'
                                             + "\n".join(connection) + "\n")
        app = write_app(Path(home) / "app")
        env = os.environ | {"FLWR_HOME": home, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        submitted = subprocess.run([str(flwr), "run", str(app), "ubsmoe", "--run-config", run_config,
                                    "--format", "json"], env=env, check=False, capture_output=True, text=True)
        run_id = _submitted_run(submitted, where, tls)
        print(f"run {run_id} started on the SuperLink at {where}; its log follows", flush=True)
        streamed = subprocess.run([str(flwr), "log", str(run_id), "ubsmoe", "--stream"], env=env, check=False)
    if streamed.returncode != 0:
        raise RuntimeError(f"flwr log ended with exit code {streamed.returncode} while showing run {run_id} "
                           "(its log is above)")
