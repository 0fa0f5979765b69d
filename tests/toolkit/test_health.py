"""toolkit.health against real `runyard server` processes, direct and through a real NGINX rendered by
`runyard nginx render` (basic, bearer, TLS), with credentials made by `runyard users` / `runyard tokens`.
Two cases the real server cannot produce on demand (a write that fails while reads work, a readiness
answer from a server we cannot break that way) use a tiny local HTTP stub; each says so."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from helpers.cli import clean_env, cli_command, run_cli
from helpers.nginx import NginxProcess
from helpers.ports import free_port
from helpers.servers import RunningServer, launch, runyard_command, start_server

from toolkit import health

USER, PASSWORD = "alice", "a long passphrase for alice"
WRONG_PASSWORD = "not alice's passphrase at all"
MADE_UP_TOKEN = "ryt_" + "q" * 43


def _api(server_url: str, path: str, method: str = "GET", **payload) -> dict:
    """A call straight to the server (no NGINX, no credentials)."""
    url = f"{server_url}/api/2.0/mlflow/{path}"
    answer = requests.get(url, params=payload, timeout=30) if method == "GET" else \
        requests.post(url, json=payload, timeout=30)
    answer.raise_for_status()
    return answer.json()


def _names(report: dict) -> list[str]:
    return [step["name"] for step in report["steps"]]


def _step(report: dict, name: str) -> dict:
    return next(step for step in report["steps"] if step["name"] == name)


def _assert_ready(report: dict) -> None:
    """A runyard server's /ready passed, its own checks nested in the report."""
    readiness = _step(report, "readiness")
    assert readiness["ok"] and not readiness.get("unsupported"), readiness
    assert readiness["details"]["status"] == "ready"
    assert readiness["details"]["checks"] and all(c["ok"] for c in readiness["details"]["checks"].values())


def _shown(report: dict) -> str:
    """Everything a user or a monitoring system could ever see of the report."""
    return health.to_json(report) + "\n" + health.format_report(report)


# --- direct -------------------------------------------------------------------------------------------

def test_a_running_server_is_ok(server):
    report = health.probe(server.url, env={})
    assert report["status"] == "ok" and health.EXIT_CODES[report["status"]] == 0
    assert report["url"] == server.url and report["auth"] == "none" and report["tls"] is None
    assert _names(report) == ["liveness", "readiness", "api_read"]
    assert all(isinstance(step["ms"], float) and "reason" not in step for step in report["steps"])
    _assert_ready(report)
    line = health.to_json(report)
    assert "\n" not in line and json.loads(line) == report
    text = health.format_report(report)
    assert text.splitlines()[0].startswith(f"OK       {server.url}")
    step_lines = [line for line in text.splitlines()[1:] if not line.startswith("    ")]  # checks: deeper
    assert [line.split()[:2] for line in step_lines] == \
        [["✓", "liveness"], ["✓", "readiness"], ["✓", "api_read"]]
    checks = _step(report, "readiness")["details"]["checks"]
    assert len(text.splitlines()) == 1 + 3 + len(checks)  # one line per server check under readiness


def test_the_write_probe_reuses_its_experiment_and_leaves_no_run(server):
    first, second = (health.probe(server.url, write=True, env={}) for _ in range(2))
    for report in (first, second):
        assert report["status"] == "ok", health.format_report(report)
        write = _step(report, "api_write")
        assert write["ok"] and write["details"]["run_deleted"]
        assert [p["name"] for p in write["details"]["phases"]][-5:] == \
            ["create-run", "log-metric", "log-param", "get-run", "delete-run"]
    experiment_id = _step(first, "api_write")["details"]["experiment_id"]
    assert _step(second, "api_write")["details"]["experiment_id"] == experiment_id
    found = _api(server.url, "experiments/search", max_results=1000, view_type="ALL")["experiments"]
    assert [e["experiment_id"] for e in found if e["name"] == health.PROBE_EXPERIMENT] == [experiment_id]
    active = _api(server.url, "runs/search", "POST", experiment_ids=[experiment_id],
                  run_view_type="ACTIVE_ONLY")
    assert active.get("runs", []) == []
    for report in (first, second):  # deleted the way any MLflow client deletes: lifecycle_stage "deleted"
        run = _api(server.url, "runs/get", run_id=_step(report, "api_write")["details"]["run_id"])["run"]
        assert run["info"]["lifecycle_stage"] == "deleted"
        assert {p["key"] for p in run["data"]["params"]} == {"probe_param"}


def test_the_write_probe_restores_its_experiment_deleted_by_hand(server):
    first = health.probe(server.url, write=True, env={})
    experiment_id = _step(first, "api_write")["details"]["experiment_id"]
    _api(server.url, "experiments/delete", "POST", experiment_id=experiment_id)
    report = health.probe(server.url, write=True, env={})
    assert report["status"] == "ok", health.format_report(report)
    assert _step(report, "api_write")["details"]["experiment_id"] == experiment_id
    experiment = _api(server.url, "experiments/get", experiment_id=experiment_id)["experiment"]
    assert experiment["lifecycle_stage"] == "active"


def test_a_path_prefix_is_part_of_the_url(tmp_path):
    prefixed = start_server(tmp_path, None, "--static-prefix", "/mlflow")
    try:
        report = health.probe(f"{prefixed.url}/mlflow/", write=True, env={})
        assert report["status"] == "ok", health.format_report(report)
        assert report["url"] == f"{prefixed.url}/mlflow"
        missing = health.probe(prefixed.url, env={})  # the prefix forgotten
        assert missing["status"] == "down"
        assert "HTTP 404" in _step(missing, "liveness")["reason"]
        assert "prefix" in _step(missing, "liveness")["reason"]
    finally:
        prefixed.stop()


def test_nothing_listening_is_down():
    url = f"http://127.0.0.1:{free_port()}"
    report = health.probe(url, write=True, env={})
    assert report["status"] == "down" and health.EXIT_CODES["down"] == 2
    liveness = _step(report, "liveness")
    assert not liveness["ok"] and liveness["reason"] == "connection refused"
    # nothing else is tried, and each step says why
    assert [(s["name"], s["ok"], s.get("skipped")) for s in report["steps"][1:]] == \
        [("readiness", False, True), ("api_read", False, True), ("api_write", False, True)]
    assert "DOWN" in health.format_report(report) and "connection refused" in health.format_report(report)


@pytest.mark.parametrize(("url", "env", "message"), [
    ("", {}, "no tracking URI"),
    ("file:///tmp/mlruns", {}, "http:// or https://"),
    ("localhost:5000", {}, "http:// or https://"),
    ("http://[::1", {}, "not a valid URL"),
    ("http://localhost:port", {}, "not a valid URL"),
    ("https://localhost:1", {"MLFLOW_TRACKING_INSECURE_TLS": "yes please"}, "MLFLOW_TRACKING_INSECURE_TLS"),
    ("https://localhost:1",
     {"MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_TRACKING_SERVER_CERT_PATH": "/ca"}, "both set"),
])
def test_an_unusable_configuration_is_down_with_the_reason(url, env, message):
    report = health.probe(url, env=env)
    assert report["status"] == "down"
    [step] = report["steps"]
    assert step["name"] == "configuration" and message in step["reason"]
    json.dumps(report)


def test_the_url_defaults_to_mlflow_tracking_uri_read_at_call_time(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    report = health.probe("")
    assert report["status"] == "ok" and report["url"] == server.url


def test_watch_emits_a_report_per_interval_until_stopped(server):
    stop, reports = threading.Event(), []

    def emit(report):
        reports.append(report)
        if len(reports) == 3:
            stop.set()

    assert health.watch(server.url, 0.01, emit=emit, stop=stop, env={}) == 0
    assert [r["status"] for r in reports] == ["ok"] * 3
    stop.clear()
    down = f"http://127.0.0.1:{free_port()}"
    assert health.watch(down, 0.01, emit=lambda r: stop.set(), stop=stop, env={}) == 2
    with pytest.raises(ValueError):
        health.watch(server.url, 0, emit=reports.append, env={})


# --- through NGINX --------------------------------------------------------------------------------------

@dataclass
class Gateway:
    url: str  # http://localhost:PORT
    tls_url: str  # https://localhost:PORT, same server
    mtls_url: str  # https://localhost:PORT, same server, client certificates required
    server: RunningServer
    certs: Path
    token: str


def _cli(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(cli_command(*args), input=stdin, capture_output=True, text=True, env=clean_env(),
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _nginx(tmp: Path, upstream: int, *flags: str) -> tuple[NginxProcess, int]:
    port = free_port()
    conf = tmp / f"nginx-{port}.conf"
    render = ["nginx", "render", "--upstream", f"127.0.0.1:{upstream}", "--listen", f"127.0.0.1:{port}",
              "--auth", "basic+token", "-o", str(conf), "--state-dir", str(tmp / f"nginx-{port}"), *flags]
    if os.geteuid() == 0:
        render += ["--worker-user", "root"]  # workers must read the 0700 temporary folders
    _cli(*render)
    return NginxProcess().start(conf), port


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    """One runyard server (htpasswd + tokens) behind three NGINX: plain HTTP, TLS and mutual TLS, with
    certificates of a self-signed CA from `runyard nginx selfsigned`."""
    tmp = tmp_path_factory.mktemp("gateway")
    htpasswd, certs = tmp / "htpasswd", tmp / "certs"
    _cli("users", "add", USER, "--htpasswd", str(htpasswd), "--password-stdin", stdin=PASSWORD + "\n")
    _cli("nginx", "selfsigned", str(certs), "--client", "robot")
    server = start_server(tmp / "server", None, "--htpasswd", str(htpasswd), "--trusted-proxies", "127.0.0.1")
    started: list[NginxProcess] = []
    try:
        result = run_cli("tokens", "create", "--name", "probe", "--user", "robot",
                         "--backend-store-uri", server.backend_uri)
        assert result.returncode == 0, result.stderr
        plain, port = _nginx(tmp, server.port)
        started.append(plain)
        secure, tls_port = _nginx(tmp, server.port, "--tls-cert", str(certs / "cert.pem"),
                                  "--tls-key", str(certs / "key.pem"))
        started.append(secure)
        mutual, mtls_port = _nginx(tmp, server.port, "--tls-cert", str(certs / "cert.pem"),
                                   "--tls-key", str(certs / "key.pem"), "--client-ca", str(certs / "ca.pem"))
        started.append(mutual)
        yield Gateway(f"http://localhost:{port}", f"https://localhost:{tls_port}",
                      f"https://localhost:{mtls_port}", server, certs, result.stdout.strip())
    finally:
        for nginx in started:
            nginx.stop()
        server.stop()


def test_through_nginx_with_basic_auth_from_the_environment(gateway, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    report = health.probe(gateway.url, write=True)  # env read when called, not at import
    assert report["status"] == "ok", health.format_report(report)
    assert report["auth"] == "basic" and _names(report) == ["liveness", "readiness", "api_read", "api_write"]
    _assert_ready(report)
    run_id = _step(report, "api_write")["details"]["run_id"]
    run = _api(gateway.server.url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["user_id"] == USER and run["info"]["lifecycle_stage"] == "deleted"
    assert PASSWORD not in _shown(report)


def test_through_nginx_with_a_token(gateway):
    report = health.probe(gateway.url, write=True, env={"MLFLOW_TRACKING_TOKEN": gateway.token})
    assert report["status"] == "ok", health.format_report(report)
    assert report["auth"] == "token"
    run_id = _step(report, "api_write")["details"]["run_id"]
    assert _api(gateway.server.url, "runs/get", run_id=run_id)["run"]["info"]["user_id"] == "robot"
    assert gateway.token not in _shown(report)


def test_credentials_in_the_url_are_used_and_never_shown(gateway):
    port = urlsplit(gateway.url).port
    report = health.probe(f"http://{USER}:{PASSWORD.replace(' ', '%20')}@localhost:{port}", env={})
    assert report["status"] == "ok", health.format_report(report)
    assert report["url"] == gateway.url and report["auth"] == "basic"
    shown = _shown(report)
    assert PASSWORD not in shown and PASSWORD.replace(" ", "%20") not in shown and "@" not in shown


@pytest.mark.parametrize(("env", "kind", "secret"), [
    ({"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": WRONG_PASSWORD}, "basic", WRONG_PASSWORD),
    ({"MLFLOW_TRACKING_TOKEN": MADE_UP_TOKEN}, "token", MADE_UP_TOKEN),
    ({}, "no credentials", None),
], ids=["wrong-password", "made-up-token", "no-credentials"])
def test_refused_credentials_are_down_with_the_reason_and_no_secret(gateway, env, kind, secret):
    report = health.probe(gateway.url, write=True, env=env)
    assert report["status"] == "down"
    assert _step(report, "liveness")["ok"]  # NGINX and the server answer; the credential is the problem
    reason = _step(report, "api_read")["reason"]
    assert reason.startswith("authentication failed (401)") and kind in reason
    assert _step(report, "api_write")["skipped"]
    if secret:
        assert secret not in _shown(report)


def test_tls_follows_the_mlflow_variables(gateway):
    basic = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
    verified = health.probe(gateway.tls_url, env={**basic, "MLFLOW_TRACKING_SERVER_CERT_PATH":
                                                  str(gateway.certs / "ca.pem")})
    assert verified["status"] == "ok", health.format_report(verified)
    assert verified["tls"] == "verified (CA file)"

    untrusted = health.probe(gateway.tls_url, env=basic)  # a self-signed CA the system does not know
    assert untrusted["status"] == "down"
    assert _step(untrusted, "liveness")["reason"].startswith("TLS: certificate verify failed")

    insecure = health.probe(gateway.tls_url, env={**basic, "MLFLOW_TRACKING_INSECURE_TLS": "true"})
    assert insecure["status"] == "ok" and insecure["tls"] == "unverified"
    assert "TLS unverified" in health.format_report(insecure).splitlines()[0]
    for report in (verified, untrusted, insecure):
        assert PASSWORD not in _shown(report)


def test_mutual_tls_with_the_client_certificate_variable(gateway, tmp_path):
    bundle = tmp_path / "robot-bundle.pem"  # the mlflow client takes one file: certificate and key
    bundle.write_bytes((gateway.certs / "client-robot.pem").read_bytes() +
                       (gateway.certs / "client-robot-key.pem").read_bytes())
    env = {"MLFLOW_TRACKING_TOKEN": gateway.token,
           "MLFLOW_TRACKING_SERVER_CERT_PATH": str(gateway.certs / "ca.pem")}
    client_cert = "MLFLOW_TRACKING_CLIENT_CERT_PATH"
    report = health.probe(gateway.mtls_url, write=True, env={**env, client_cert: str(bundle)})
    assert report["status"] == "ok", health.format_report(report)
    without = health.probe(gateway.mtls_url, env=env)
    assert without["status"] == "down"
    assert "certificate" in _step(without, "liveness")["reason"]
    missing = health.probe(gateway.mtls_url, env={**env, client_cert: str(tmp_path / "no")})
    assert missing["status"] == "down"
    assert _step(missing, "liveness")["reason"].startswith("TLS setup: ")


# --- readiness ------------------------------------------------------------------------------------------

def test_a_read_only_artifact_destination_is_degraded(tmp_path, read_only_folder):
    port = free_port()
    backend = str(tmp_path / "mlruns")
    command = runyard_command("server", "--backend-store-uri", backend, "--artifacts-destination",
                              str(read_only_folder), "--port", str(port))
    server = launch(command, tmp_path, port, backend, read_only_folder)
    try:
        report = health.probe(server.url, write=True, env={})
        readiness = _step(report, "readiness")
        assert report["status"] == "degraded", health.format_report(report)
        assert not readiness["ok"] and readiness["details"]["status"] == "not_ready"
        failing = [name for name, check in readiness["details"]["checks"].items() if not check["ok"]]
        assert failing == ["artifacts"] and readiness["reason"].startswith("not ready: artifacts: ")
        assert _step(report, "api_read")["ok"]
        assert _step(report, "api_write")["ok"]  # the write probe logs no artifact
        assert health.EXIT_CODES[report["status"]] == 1
    finally:
        server.stop()


class _Stub(ThreadingHTTPServer):
    """A few canned answers by (method, path); records every request."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, dict | str]]):
        self.answers, self.requests = answers, []
        super().__init__(("127.0.0.1", 0), _StubHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        path = urlsplit(self.path).path
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.command, path, body))
        status, payload = self.server.answers.get((self.command, path),
                                                  (404, {"error_code": "ENDPOINT_NOT_FOUND"}))
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain" if isinstance(payload, str) else "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub() -> Iterator:
    started: list[_Stub] = []

    def start(answers: dict) -> _Stub:
        server = _Stub(answers)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


API = "/api/2.0/mlflow"
READS = {("GET", "/health"): (200, "OK"), ("GET", f"{API}/experiments/search"): (200, {"experiments": []})}


def test_a_failing_readiness_check_is_degraded(stub):
    # Unit level, on a stub: a server that answers and reads but says it is not ready. The same case on a
    # real server is test_a_read_only_artifact_destination_is_degraded.
    checks = {"database": {"ok": True, "ms": 1.5},
              "artifacts": {"ok": False, "ms": 0.4, "reason": "cannot write to /srv/artifacts"}}
    server = stub({**READS, ("GET", "/ready"): (503, {"status": "not_ready", "checks": checks})})
    report = health.probe(server.url, env={})
    assert report["status"] == "degraded"
    readiness = _step(report, "readiness")
    assert readiness["details"] == {"status": "not_ready", "checks": checks}
    assert readiness["reason"] == "not ready: artifacts: cannot write to /srv/artifacts"
    text = health.format_report(report)
    assert text.startswith("DEGRADED") and "✗ readiness" in text
    assert any(line.split()[:2] == ["✗", "artifacts"] and line.endswith("cannot write to /srv/artifacts")
               for line in text.splitlines())


def test_a_server_without_ready_is_unsupported_not_failing(stub):
    # Unit level, on a stub: what an MLflow server answers (404 on /ready).
    report = health.probe(stub(READS).url, env={})
    assert report["status"] == "ok"
    assert _step(report, "readiness")["unsupported"] and _step(report, "readiness")["ok"]
    assert "unsupported" in health.format_report(report)


def test_a_failed_write_is_degraded_and_the_run_is_deleted_all_the_same(stub):
    # Unit level, on a stub: a server whose reads work and whose metric writes fail, which a real server
    # does not do on demand.
    run = {"run": {"info": {"run_id": "r1"}}}
    server = stub({**READS, ("GET", "/ready"): (200, {"status": "ready", "checks": {}}),
                   ("GET", f"{API}/experiments/get-by-name"): (200, {"experiment": {
                       "experiment_id": "7", "name": health.PROBE_EXPERIMENT, "lifecycle_stage": "active"}}),
                   ("POST", f"{API}/runs/create"): (200, run),
                   ("POST", f"{API}/runs/log-metric"): (500, {"error_code": "INTERNAL_ERROR",
                                                              "message": "database is locked"}),
                   ("POST", f"{API}/runs/delete"): (200, {})})
    report = health.probe(server.url, write=True, env={})
    assert report["status"] == "degraded"
    write = _step(report, "api_write")
    assert write["reason"] == "log-metric: HTTP 500: INTERNAL_ERROR: database is locked"
    assert write["details"]["run_deleted"] and write["details"]["run_id"] == "r1"
    assert ("POST", f"{API}/runs/delete", {"run_id": "r1"}) in server.requests
    assert not any(path.endswith(("log-parameter", "runs/get")) for _, path, _ in server.requests)


def test_the_cli_prints_json_and_exits_with_the_status(server):
    up = run_cli("health", server.url, "--json", "--write")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["status"] == "ok"
    down = run_cli("health", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2 and "down" in down.stdout.lower()
