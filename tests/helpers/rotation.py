"""Steady traffic through a real NGINX while a credential or certificate is rotated (`runyard rotate`).

    gw = start_gateway(tmp_path, server, auth="token", tls=(cert, key))   # nginx in front of `server`
    load = Load(gw.url, experiment_id, auth=bearer, secret=path, verify=ca_bundle).start()
    load.wait_for_requests(20)        # every thread has made 20 more successful requests
    ... rotate ...
    tally = load.stop()               # tally.failures must be []

Each thread creates a run and logs one metric point after another (runs/log-metric, step 1, 2, …) with
the credential it read from the `secret` file, behaving as a well-behaved client does:
  - on a 401 it re-reads the credential from the secret and sends the request again, once;
  - when the server closed the connection before any answer (a keep-alive connection an NGINX worker
    closed as it left after a reload), it sends the request again on a new connection, once. Logging the
    same point twice is safe (identical points are stored once), and `check_history` proves nothing was
    lost or doubled.
Anything else, or a second failure of the same request, is a failed request.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests.auth import AuthBase, HTTPBasicAuth

from helpers.nginx import NginxProcess
from helpers.ports import free_port, wait_for
from helpers.servers import RunningServer
from toolkit import nginx as nginx_config

API = "/api/2.0/mlflow"
PROGRESS_TIMEOUT_S = 120


@dataclass
class Gateway:
    url: str
    server: RunningServer
    nginx: NginxProcess
    conf: Path
    pid_file: Path


def start_gateway(tmp_path: Path, server: RunningServer, auth: str, tls: tuple[str, str] | None = None,
                  name: str = "nginx") -> Gateway:
    """A real NGINX (`toolkit.nginx` config, validated) in front of `server` on a free port."""
    port = free_port()
    state = tmp_path / f"{name}-state"
    settings = nginx_config.NginxSettings(
        upstreams=(f"127.0.0.1:{server.port}",), listen=f"127.0.0.1:{port}", auth=auth,
        tls_cert=tls[0] if tls else None, tls_key=tls[1] if tls else None, state_dir=str(state),
        worker_user="root" if os.geteuid() == 0 else None,
        login_rate="100r/s")  # refusals are part of these tests: no rate limit in their way
    conf = Path(nginx_config.write(settings, tmp_path / f"{name}.conf"))
    process = NginxProcess().start(conf)
    scheme = "https" if tls else "http"
    return Gateway(f"{scheme}://localhost:{port}", server, process, conf, state / "nginx.pid")


def bearer(token: str) -> AuthBase:
    class _Bearer(AuthBase):
        def __call__(self, request):
            request.headers["Authorization"] = f"Bearer {token}"
            return request

    return _Bearer()


def basic(user: str) -> Callable[[str], AuthBase]:
    return lambda password: HTTPBasicAuth(user, password)


def _closed_before_answer(exc: BaseException) -> bool:
    seen, todo = set(), [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError
                      | ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return True
        todo.extend(x for x in (getattr(item, "reason", None), item.__cause__, item.__context__,
                                *getattr(item, "args", ())) if isinstance(x, BaseException))
    return False


@dataclass
class Tally:
    ok: int = 0
    reauths: int = 0  # 401 -> credential re-read from the secret -> success
    reconnects: int = 0  # connection closed before any answer -> sent again on a new one
    failures: list[str] = field(default_factory=list)
    run_id: str | None = None
    steps: list[int] = field(default_factory=list)
    credential: str | None = None  # the one in use at the end (tests compare it with the new one)


class Load:
    def __init__(self, url: str, experiment_id: str, auth: Callable[[str], AuthBase], secret: Path,
                 threads: int = 4, verify: bool | str = True):
        self.url, self.experiment_id, self.auth, self.secret = url, experiment_id, auth, secret
        self.verify = verify
        self.tallies = [Tally() for _ in range(threads)]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in self.tallies]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _read(self) -> str:
        return self.secret.read_text().strip()

    def _call(self, session: requests.Session, tally: Tally, path: str, body: dict) -> dict | None:
        reauthed = reconnected = False
        while True:
            try:
                answer = session.post(f"{self.url}{API}/{path}", json=body, auth=self.auth(tally.credential),
                                      verify=self.verify, timeout=120)
            except requests.RequestException as exc:
                if not reconnected and _closed_before_answer(exc):
                    reconnected = True
                    tally.reconnects += 1
                    continue
                tally.failures.append(f"{path}: {type(exc).__name__}: {exc}")
                return None
            if answer.status_code == 401 and not reauthed:
                reauthed = True
                tally.reauths += 1
                tally.credential = self._read()
                continue
            if answer.status_code != 200:
                tally.failures.append(f"{path}: HTTP {answer.status_code}: {answer.text[:200]}")
                return None
            return answer.json()

    def _run(self, tally: Tally) -> None:
        tally.credential = self._read()
        with requests.Session() as session:
            created = self._call(session, tally, "runs/create", {"experiment_id": self.experiment_id})
            if created is None:
                return
            tally.run_id = created["run"]["info"]["run_id"]
            step = 0
            while not self._stop.is_set():
                step += 1
                point = {"run_id": tally.run_id, "key": "loss", "value": float(step),
                         "timestamp": 1_000 + step, "step": step}
                if self._call(session, tally, "runs/log-metric", point) is not None:
                    tally.ok += 1
                    tally.steps.append(step)

    def wait_for_requests(self, count: int) -> None:
        """Returns once every thread has made `count` more successful requests (or one has failed)."""
        start = [t.ok for t in self.tallies]
        done = wait_for(lambda: any(t.failures for t in self.tallies)
                        or all(t.ok - s >= count for t, s in zip(self.tallies, start, strict=True)),
                        PROGRESS_TIMEOUT_S, interval=0.02)
        assert done, f"the load made no progress: {[t.ok for t in self.tallies]} after {start}"

    def stop(self) -> Tally:
        """Stops the threads; the sum of their tallies (failures listed with their thread)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=PROGRESS_TIMEOUT_S)
        total = Tally()
        for i, tally in enumerate(self.tallies):
            total.ok += tally.ok
            total.reauths += tally.reauths
            total.reconnects += tally.reconnects
            total.failures += [f"thread {i}: {failure}" for failure in tally.failures]
        return total

    def check_history(self, server: RunningServer) -> None:
        """Every acknowledged point is stored, once: straight from the server, bypassing NGINX."""
        for tally in self.tallies:
            stored, token = [], None
            while True:
                params = {"run_id": tally.run_id, "metric_key": "loss"}
                if token:
                    params["page_token"] = token
                answer = requests.get(f"{server.url}{API}/metrics/get-history", params=params, timeout=60)
                answer.raise_for_status()
                stored += [m["step"] for m in answer.json().get("metrics", [])]
                token = answer.json().get("next_page_token")
                if not token:
                    break
            assert sorted(stored) == sorted(tally.steps), f"run {tally.run_id}: stored points differ"
