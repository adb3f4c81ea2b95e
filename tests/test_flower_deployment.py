"""A real Flower deployment on loopback: one SuperLink and two SuperNodes as separate processes, TLS
with certificates made for the test (the loopback address in the SuperLink certificate's SAN), runs
submitted with ``ubsmoe flower run``. The first run gives the in-process numbers; in the second, a
SuperNode is killed while it trains, and the run goes on without it after the round timeout and
records who dropped in which rounds. Every process started here is ended by its process group.
A user's mistake (no SuperLink at the address, a CA file that is no certificate, an address without
its port) is one line and exit code 2, found before anything is submitted: no SuperLink needed."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is the optional extra ubsmoe[flower]")

from tiny_experiment import tiny_overrides  # noqa: E402
from ubsmoe.cli import main  # noqa: E402
from ubsmoe.config import MissingPackageError, load_config  # noqa: E402
from ubsmoe.engine.flower.deployment import flwr_executable  # noqa: E402
from ubsmoe.engine.rounds import run_experiment  # noqa: E402
from ubsmoe.engine.run_folder import read_results

from test_client_server import deterministic  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """A SuperLink (TLS, runtime dependency installation off) and one SuperNode per partition, each in
    its own process group, with FLWR_HOME in the test's folder and telemetry off."""

    def __init__(self, folder: Path, partitions: int):
        from ubsmoe.engine.flower.certificates import write_certificates

        self.folder = folder
        self.certs = write_certificates(folder / "certs", ["127.0.0.1", "localhost"])
        self.env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                 "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                 "FLWR_LOG_LEVEL": "INFO"}  # the test reads the processes' logs
        self.port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}
        try:
            self.launch(partitions)
        except BaseException:
            self.stop()
            raise

    def launch(self, partitions: int) -> None:
        folder = self.folder
        self.start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.certs["ca"]),
                                 "--ssl-certfile", str(self.certs["certificate"]), "--ssl-keyfile", str(self.certs["key"]),
                                 "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                 "--port", str(self.port)], folder / "superlink-home")
        self.wait_for("superlink", "Uvicorn running", 60)
        for i in range(partitions):
            self.start(f"node{i}", [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                    "--root-certificates", str(self.certs["ca"]),
                                    "--node-config", f'partition-id={i} cache-dir="{folder / f"node{i}-cache"}"',
                                    "--port", str(free_port())], folder / f"node{i}-home")
        for i in range(partitions):
            self.wait_for(f"node{i}", "SuperNode ID", 60)

    def start(self, name: str, command: list[str], home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env | {"FLWR_HOME": str(home)}, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, within_s: float, after: int = 0) -> None:
        deadline = time.monotonic() + within_s
        while text not in self.log(name)[after:]:
            if time.monotonic() > deadline or self.processes[name].poll() is not None:
                raise AssertionError(f"{name} did not log {text!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.processes[name].pid, sig)
        except ProcessLookupError:
            pass
        self.processes[name].wait(timeout=30)

    def stop(self) -> None:
        for name in self.processes:
            self.kill(name, signal.SIGTERM)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    started = Deployment(tmp_path_factory.mktemp("deployment"), partitions=2)
    yield started
    started.stop()


def submit(deployment: Deployment, out: Path, overrides: list[str], round_timeout: float) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ubsmoe"), "flower", "run", "--superlink", f"127.0.0.1:{deployment.port}",
                             "--root-certificates", str(deployment.certs["ca"]), "--out", str(out),
                             "--round-timeout", str(round_timeout), "--node-wait", "60"] + overrides,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=deployment.env,
                            start_new_session=True)


def finish(process: subprocess.Popen, within_s: float) -> str:
    try:
        output, _ = process.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"the run did not end within {within_s} s:\n{output.decode(errors='replace')[-3000:]}")
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    return output.decode(errors="replace")


def test_tls_deployment_gives_the_in_process_numbers(deployment, tiny_bert, tiny_task, tmp_path):
    overrides = tiny_overrides(tiny_bert, tiny_task, threads=1)

    finish(submit(deployment, tmp_path / "out", overrides, round_timeout=300), within_s=600)

    results = read_results(tmp_path / "out")
    assert results.engine == "flower" and len(results.history) == 2
    assert deterministic(results) == deterministic(run_experiment(load_config(overrides=overrides), show_progress=False))
    assert results.history[0].failed_clients is None


def test_a_supernode_killed_mid_round_is_dropped_after_the_timeout(deployment, tiny_bert, tiny_task, tmp_path):
    overrides = tiny_overrides(tiny_bert, tiny_task, threads=1)
    seen = len(deployment.log("node1"))

    run = submit(deployment, tmp_path / "out", overrides, round_timeout=20)
    assert list((deployment.folder / "node1-cache").glob("*.safetensors"))  # the first run's upcycling, kept
    deployment.wait_for("node1", "Receiving: train message", 300, after=seen)
    deployment.kill("node1")  # the SuperNode and the ClientApp it started, mid-round
    finish(run, within_s=600)

    results = read_results(tmp_path / "out")
    for entry in results.history:  # round 1 (killed while training) and round 2 (gone)
        assert [c.id for c in entry.clients] == [0]
        assert [f.client_id for f in entry.failed_clients] == [1]
    assert len(results.history) == 2


@pytest.mark.parametrize("superlink, tls, message", [
    ("127.0.0.1:{port}", "--insecure", "no SuperLink answers at 127.0.0.1:{port} (connection refused): start it"),
    ("127.0.0.1:{port}", "--root-certificates", "is not a PEM certificate: give the CA certificate (ca.crt) written by "
                                                "`ubsmoe flower certificates`"),
    ("localhost", "--insecure", "--superlink localhost has no port: give HOST:PORT"),
], ids=["no-superlink", "not-a-certificate", "no-port"])
def test_a_user_error_is_one_line_and_exit_code_2(superlink, tls, message, tmp_path, capfd):
    port = free_port()
    certificate = tmp_path / "ca.crt"
    certificate.write_text("hello\n")
    connection = ["--insecure"] if tls == "--insecure" else [tls, str(certificate)]

    code = main(["flower", "run", "--superlink", superlink.format(port=port), *connection,
                 "--out", str(tmp_path / "out"), "--node-wait", "1", "federation.rounds=1"])

    captured = capfd.readouterr()
    assert code == 2
    assert captured.err.startswith("ubsmoe: error: ") and captured.err.count("\n") == 1
    assert message.format(port=port) in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


def test_flwr_is_found_on_path_else_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    on_path = tmp_path / "bin" / "flwr"
    on_path.parent.mkdir()
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(on_path.parent))

    assert flwr_executable() == on_path
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingPackageError, match=r"pip install 'ubsmoe\[flower\]'"):
        flwr_executable()
