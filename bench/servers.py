"""Start and stop the servers under test, and read their memory from /proc.

Each server runs in its own session (process group), so stopping it by that group also stops the
worker processes uvicorn forks. Ports come from binding port 0 at run time, never a fixed number.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import requests

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ServerSpec:
    kind: str      # "runyard" or "mlflow"
    workers: int

    @property
    def name(self) -> str:
        return f"{self.kind} w{self.workers}"


class ServerStartError(RuntimeError):
    pass


@dataclass
class Server:
    spec: ServerSpec
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def rss_mb(self) -> float:
        return tree_rss_bytes(self.proc.pid) / 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(spec: ServerSpec, exe: Path, backend_uri: str, artifacts: Path, port: int) -> list[str]:
    cmd = [str(exe), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts),
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(spec.workers)]
    return cmd


def server_env(spec: ServerSpec) -> dict[str, str]:
    # Start from our environment but drop MLflow/Runyard settings a developer may have exported,
    # so both servers see only the flags above.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "RUNYARD_", "VIRTUAL_ENV", "PYTHONPATH"))}
    if spec.kind == "mlflow":
        # GenAI job consumers are irrelevant to tracking; off, they cost MLflow neither CPU nor RSS.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def start(spec: ServerSpec, cmd: list[str], port: int, log_path: Path, cwd: Path,
          timeout: float = 90.0, extra_env: dict[str, str] | None = None) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=cwd, env={**server_env(spec), **(extra_env or {})},
                                    start_new_session=True)
        except OSError as exc:
            raise ServerStartError(f"{spec.name}: cannot execute {cmd[0]}: {exc}") from exc
    server = Server(spec, proc, port, log_path)
    try:
        wait_healthy(server, timeout)
    except ServerStartError:
        stop(server)
        raise
    return server


def wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = server.base_url + "/health"
    while time.monotonic() < deadline:
        code = server.exit_code()
        if code is not None:
            raise ServerStartError(f"{server.spec.name} exited with code {code} before it was ready\n"
                                   + log_tail(server.log_path))
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise ServerStartError(f"{server.spec.name} not healthy after {timeout:.0f}s\n"
                           + log_tail(server.log_path))


def stop(server: Server, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
    pgid = server.proc.pid  # start_new_session=True makes the server its own group leader
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            server.proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give forked workers of the same group a moment, then move on.
        if not _group_alive(pgid, wait=2.0):
            break


def _group_alive(pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + line for line in text[-lines:])


def tree_pids(root: int) -> list[int]:
    """The process and all its descendants, found through the parent pid in /proc/<pid>/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces or parentheses; fields after the last ')' are safe.
        ppid = int(stat.rpartition(b")")[2].split()[1])
        children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            pass  # the process ended between listing and reading
    return total
