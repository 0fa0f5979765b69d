"""A real nginx as a child process of the test, for configurations rendered by `toolkit.nginx`.

    proc = NginxProcess().start(conf_path)   # waits for its pid file and every `listen` address
    ...; proc.reload()                          # SIGHUP; returns once new workers run the new config
    proc.error_log()                            # text of the error_log file the configuration names
    proc.output()                               # its stdout/stderr (`<conf>.stderr` beside the file)
    proc.stop()                                 # by PID: SIGTERM, then SIGKILL of its own process group

Also a context manager. Ports and state come from the configuration, so whoever renders it picks free
ports and a temporary state directory.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from helpers.ports import wait_for
from toolkit.nginx import find_nginx

START_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10

_LISTEN = re.compile(r"^\s*listen\s+([^\s;]+)", re.MULTILINE)
_ERROR_LOG = re.compile(r"^\s*error_log\s+([^\s;]+)", re.MULTILINE)
_PID = re.compile(r"^\s*pid\s+([^\s;]+)", re.MULTILINE)


def listen_addresses(conf_text: str) -> list[tuple[str, int]]:
    """(host, port) to connect to for each `listen` directive: wildcards become loopback."""
    addresses = []
    for value in _LISTEN.findall(conf_text):
        host, _, port = value.rpartition(":")
        if not port.isdigit():
            continue  # unix: sockets
        host = host.strip("[]")
        if host in ("", "*", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        addresses.append((host, int(port)))
    return addresses


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxProcess:
    def __init__(self, binary: str | None = None):
        self.binary = binary or find_nginx()
        self.proc: subprocess.Popen | None = None
        self.conf_path: Path | None = None
        self.error_log_path: Path | None = None
        self.stderr_path: Path | None = None

    # --- life cycle -------------------------------------------------------------------------------
    def start(self, conf_path: str | os.PathLike, timeout: float = START_TIMEOUT_S) -> NginxProcess:
        """Runs `nginx -c conf_path -g 'daemon off;'` and waits for its listeners; on failure stops it
        and raises with nginx's own words."""
        if self.proc is not None:
            raise RuntimeError("this nginx is already started")
        self.conf_path = Path(conf_path).absolute()
        text = self.conf_path.read_text()
        found = _ERROR_LOG.search(text)
        self.error_log_path = Path(found.group(1)) if found and found.group(1) != "stderr" else None
        self.stderr_path = self.conf_path.with_name(self.conf_path.name + ".stderr")
        addresses = listen_addresses(text)
        found = _PID.search(text)
        pid_file = Path(found.group(1)) if found else None
        with open(self.stderr_path, "wb") as stderr:
            # its own session: workers are stopped with the master even if the master is killed
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path), "-g", "daemon off;"],
                                         stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                         start_new_session=True)

        def up() -> bool:
            # nginx writes its pid file once its sockets are bound: a port that accepts before that
            # belongs to someone else
            if pid_file is not None and _read(pid_file) != str(self.proc.pid):
                return False
            return all(_accepts(host, port) for host, port in addresses)

        ready = wait_for(lambda: self.proc.poll() is not None or up(), timeout, interval=0.02)
        if not ready or self.proc.poll() is not None:
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(f"nginx did not start (exit code {code}) with {self.conf_path}:\n"
                               f"{self.output()}\n{self.error_log()}".rstrip())
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stray workers of our own session, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def reload(self, timeout: float = START_TIMEOUT_S) -> None:
        """SIGHUP (what `nginx -s reload` sends). Returns once new workers run and the old ones have
        left (they finish open requests first; after `timeout` this returns while they drain). Raises
        with nginx's complaint when it refused the new configuration: the old one keeps serving then."""
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError("nginx is not running")
        old = self.workers()
        log_size = self._error_log_size()
        self.proc.send_signal(signal.SIGHUP)

        def settled() -> bool:
            current = self.workers()
            return bool(current - old) and not current & old or self._reload_failed(log_size) is not None

        wait_for(settled, timeout, interval=0.02)
        failure = self._reload_failed(log_size)
        if failure is not None:
            raise RuntimeError(f"nginx refused the new configuration: {failure}")
        if not self.workers() - old:
            raise RuntimeError(f"nginx did not start new workers within {timeout} s of SIGHUP")

    def __enter__(self) -> NginxProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- inspection -------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def workers(self) -> set[int]:
        """PIDs of the master's children (its workers)."""
        if self.proc is None:
            return set()
        children = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state, ppid, ...
            if len(fields) > 1 and fields[1] == str(self.proc.pid):
                children.add(int(entry))
        return children

    def error_log(self) -> str:
        """The error_log file of the configuration ("" when it names none or it is not written yet)."""
        if self.error_log_path is None or not self.error_log_path.exists():
            return ""
        return self.error_log_path.read_text(errors="replace")

    def output(self) -> str:
        """What nginx wrote to stdout/stderr (early start-up errors go there)."""
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")

    def _error_log_size(self) -> int:
        try:
            return self.error_log_path.stat().st_size if self.error_log_path else 0
        except FileNotFoundError:
            return 0

    def _reload_failed(self, offset: int) -> str | None:
        if self.error_log_path is None or not self.error_log_path.exists():
            return None
        with open(self.error_log_path, errors="replace") as handle:
            handle.seek(offset)
            for line in handle:
                if "[emerg]" in line:
                    return line.strip()
        return None


def wait_closed(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    """True once nothing accepts on host:port any more."""
    return wait_for(lambda: not _accepts(host, port), timeout, interval=0.05)

