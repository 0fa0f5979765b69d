"""`runyard server` as a real subprocess on a free port, for tests that speak HTTP to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from helpers.ports import free_port, wait_for

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10


def runyard_command(*args: str) -> list[str]:
    """The `runyard` CLI of the interpreter running the tests, whatever venv that is."""
    return [sys.executable, "-m", "toolkit.cli", *args]


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    port: int
    artifacts: Path  # the --artifacts-destination folder
    backend_uri: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for the whole process group (workers included) after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: stray workers, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def _healthy(health_url: str) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def launch(command: list[str], workdir: Path, port: int, backend_uri: str, artifacts: Path,
           env: dict | None = None, prefix: str = "") -> RunningServer:
    """Runs a `runyard server` command line (logging to `workdir`) and waits for GET /health == 200 on
    `port`; on failure stops it and raises with the log tail."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True)
    server = RunningServer(f"http://127.0.0.1:{port}", port, artifacts, backend_uri, proc, log_path)
    health_url = f"{server.url}{prefix}/health"
    if not wait_for(lambda: proc.poll() is not None or _healthy(health_url), timeout=START_TIMEOUT_S) \
            or proc.poll() is not None:
        server.stop()
        tail = "\n".join(server.log().splitlines()[-40:])
        raise RuntimeError(f"runyard server did not become healthy (exit code {proc.returncode}); "
                           f"command: {' '.join(command)}\n--- log tail ---\n{tail}")
    return server


def start_server(workdir: Path, backend_uri: str | None = None, *extra_flags: str, workers: int = 1,
                 env: dict | None = None) -> RunningServer:
    """Starts `runyard server` on a free port with its state under `workdir`; waits until healthy."""
    port = free_port()
    backend_uri = backend_uri or str(workdir / "mlruns")
    artifacts = workdir / f"artifacts-{port}"
    command = runyard_command("server", "--backend-store-uri", backend_uri, "--artifacts-destination",
                              str(artifacts), "--port", str(port), "--workers", str(workers), *extra_flags)
    flags = list(extra_flags)
    prefix = flags[flags.index("--static-prefix") + 1].rstrip("/") if "--static-prefix" in flags else ""
    return launch(command, workdir, port, backend_uri, artifacts, env, prefix)
