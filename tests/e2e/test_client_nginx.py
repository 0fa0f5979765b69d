"""The stock mlflow client through a real NGINX rendered by `runyard nginx render`, in front of a real
`runyard server`: each way MLflow clients authenticate (basic, bearer, TLS without verification, TLS
with a CA file, mutual TLS), refusals that write nothing, every route closed without credentials, and
the same under a path prefix. Credentials come from `runyard users` / `runyard tokens`, certificates
from `runyard nginx selfsigned`: the toolkit is driven as an operator would."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import requests
from helpers.cli import clean_env, cli_command, run_cli
from helpers.nginx import NginxProcess
from helpers.ports import free_port
from helpers.servers import RunningServer
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from server.app import all_routes

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice", "a long passphrase for alice"
LARGE_MB = int(os.environ.get("RUNYARD_TEST_LARGE_MB", "1024"))
CLIENT_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH",
              "MLFLOW_TRACKING_CLIENT_CERT_PATH")


@dataclass
class Gateway:
    url: str  # what clients use as MLFLOW_TRACKING_URI
    server: RunningServer  # the runyard server behind NGINX, for checks that bypass it
    nginx: NginxProcess
    certs: Path
    prefix: str

    def token(self, *flags: str) -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        result = run_cli("tokens", "create", "--name", name, "--user", "robot",
                         "--backend-store-uri", self.server.backend_uri, *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def direct(self, path: str, **params) -> dict:
        """A GET straight to the server (no NGINX, no credentials)."""
        answer = requests.get(f"{self.server.url}{self.prefix}/api/2.0/mlflow/{path}", params=params,
                              timeout=30)
        answer.raise_for_status()
        return answer.json()


def _cli(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(cli_command(*args), input=stdin, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr


@pytest.fixture
def gateway(server_factory, tmp_path):
    """gateway(auth, tls=None|"tls"|"mtls", prefix="", login_rate=None) -> Gateway."""
    started: list[NginxProcess] = []

    def open_gateway(auth: str, tls: str | None = None, prefix: str = "", login_rate: str | None = None
                     ) -> Gateway:
        htpasswd, certs = tmp_path / "htpasswd", tmp_path / "certs"
        if not htpasswd.exists():
            _cli("users", "add", USER, "--htpasswd", str(htpasswd), "--password-stdin",
                 stdin=PASSWORD + "\n")
            _cli("nginx", "selfsigned", str(certs), "--client", "robot")
        flags = ["--htpasswd", str(htpasswd), "--trusted-proxies", "127.0.0.1"]
        server = server_factory(None, *flags, *(["--static-prefix", prefix] if prefix else []))
        port = free_port()
        conf = tmp_path / f"nginx-{port}.conf"
        render = ["nginx", "render", "--upstream", f"127.0.0.1:{server.port}",
                  "--listen", f"127.0.0.1:{port}", "--auth", auth, "-o", str(conf),
                  "--state-dir", str(tmp_path / f"nginx-{port}")]
        if os.geteuid() == 0:
            render += ["--worker-user", "root"]  # workers must read the 0700 temporary folders
        if prefix:
            render += ["--static-prefix", prefix]
        if login_rate:
            render += ["--login-rate", login_rate]
        if tls:
            render += ["--tls-cert", str(certs / "cert.pem"), "--tls-key", str(certs / "key.pem")]
        if tls == "mtls":
            render += ["--client-ca", str(certs / "ca.pem")]
        _cli(*render)
        started.append(NginxProcess().start(conf))
        scheme = "https" if tls else "http"
        return Gateway(f"{scheme}://localhost:{port}{prefix}", server, started[-1], certs, prefix)

    yield open_gateway
    for nginx in started:
        nginx.stop()


@pytest.fixture(autouse=True)
def _client_env(monkeypatch):
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield
    with contextlib.suppress(MlflowException, requests.RequestException, OSError):
        if mlflow.active_run() is not None:
            mlflow.end_run()


def _connect(monkeypatch, gw: Gateway, **env: str) -> MlflowClient:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gw.url)
    mlflow.set_tracking_uri(gw.url)
    return MlflowClient(tracking_uri=gw.url)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _large_file(path: Path, mb: int) -> Path:
    block = os.urandom(2**20)
    with open(path, "wb") as f:
        for i in range(mb):
            f.write(i.to_bytes(8, "little") + block[8:])  # every MiB differs: a misplaced chunk shows
    return path


def _lifecycle(gw: Gateway, client: MlflowClient, tmp_path: Path, expected_user: str) -> None:
    """A whole run as a training script does it, then a large artifact both ways."""
    name = f"nginx-{uuid.uuid4().hex[:8]}"
    exp_id = mlflow.set_experiment(name).experiment_id
    with mlflow.start_run(run_name="through-nginx") as run:
        mlflow.log_params({"lr": "0.01", "layers": "3"})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({f"m{i}": float(i) for i in range(50)})
        mlflow.set_tag("stage", "e2e")
        source = _large_file(tmp_path / "weights.bin", LARGE_MB)
        mlflow.log_artifact(str(source), artifact_path="model")
    run_id = run.info.run_id
    source_digest = _sha256(source)
    source.unlink()

    fetched = client.get_run(run_id)
    assert fetched.info.status == "FINISHED"
    assert fetched.data.params == {"lr": "0.01", "layers": "3"}
    assert fetched.data.metrics["loss"] == 0.2 and fetched.data.metrics["m49"] == 49.0
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    # The proxy said who it was: the run is theirs, whatever the client's login name is.
    assert fetched.info.user_id == expected_user
    assert fetched.data.tags["mlflow.user"] == expected_user
    found = client.search_runs([exp_id], "params.lr = '0.01' and metrics.loss < 0.5")
    assert [r.info.run_id for r in found] == [run_id]
    [listed] = client.list_artifacts(run_id, "model")
    assert (listed.path, listed.file_size) == ("model/weights.bin", LARGE_MB * 2**20)

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/weights.bin",
                                                dst_path=str(tmp_path / "download"))
    assert _sha256(Path(local)) == source_digest
    Path(local).unlink()
    client.delete_run(run_id)
    assert gw.direct("runs/get", run_id=run_id)["run"]["info"]["lifecycle_stage"] == "deleted"


def test_basic_auth(gateway, monkeypatch, tmp_path):
    gw = gateway("basic")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    _lifecycle(gw, client, tmp_path, USER)


def test_bearer_token(gateway, monkeypatch, tmp_path):
    gw = gateway("token")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_TOKEN=gw.token("--expires", "1d"))
    _lifecycle(gw, client, tmp_path, "robot")


def test_tls_without_verification(gateway, monkeypatch, tmp_path):
    gw = gateway("basic+token", tls="tls")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_TOKEN=gw.token(), MLFLOW_TRACKING_INSECURE_TLS="true")
    _lifecycle(gw, client, tmp_path, "robot")


def test_tls_verified_against_the_ca(gateway, monkeypatch, tmp_path):
    gw = gateway("basic+token", tls="tls")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD,
                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(gw.certs / "ca.pem"))
    _lifecycle(gw, client, tmp_path, USER)
    # Without the CA the certificate is not trusted: the client refuses to talk at all.
    monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
    with pytest.raises(MlflowException, match="(?i)certificate|ssl"):
        client.search_experiments()


def test_mutual_tls(gateway, monkeypatch, tmp_path):
    gw = gateway("basic", tls="mtls")
    bundle = tmp_path / "robot-bundle.pem"  # the client takes one file holding certificate and key
    bundle.write_bytes((gw.certs / "client-robot.pem").read_bytes() + (gw.certs / "client-robot-key.pem")
                       .read_bytes())
    bundle.chmod(0o600)
    env = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD,
           "MLFLOW_TRACKING_SERVER_CERT_PATH": str(gw.certs / "ca.pem")}
    client = _connect(monkeypatch, gw, **env, MLFLOW_TRACKING_CLIENT_CERT_PATH=str(bundle))
    _lifecycle(gw, client, tmp_path, USER)
    # The right password without a client certificate gets nowhere.
    monkeypatch.delenv("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    with pytest.raises(MlflowException):
        client.search_experiments()


def _refused(call, *args, **kwargs) -> None:
    with pytest.raises(MlflowException) as info:
        call(*args, **kwargs)
    assert info.value.error_code == "UNAUTHENTICATED", info.value.message


def _writes_nothing(gw: Gateway, client: MlflowClient, run_id: str) -> None:
    name = f"refused-{uuid.uuid4().hex[:8]}"
    _refused(client.create_experiment, name)
    _refused(client.log_metric, run_id, "loss", 1.0)
    _refused(client.log_batch, run_id, params=[Param("p", "v")])
    _refused(client.set_terminated, run_id)
    _refused(client.search_experiments)
    _refused(client.list_artifacts, run_id)
    names = [e["name"] for e in gw.direct("experiments/search", max_results=1000)["experiments"]]
    assert name not in names
    run = gw.direct("runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "RUNNING"
    assert "metrics" not in run["data"] and "params" not in run["data"]


def _open_run(gw: Gateway) -> str:
    """A run made by an authorised client, which the refused ones then try to change."""
    answer = requests.post(f"{gw.url}/api/2.0/mlflow/runs/create", json={"experiment_id": "0"},
                           auth=(USER, PASSWORD), timeout=30)
    answer.raise_for_status()
    return answer.json()["run"]["info"]["run_id"]


@pytest.mark.parametrize("env", [
    {},
    {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": "not the password"},
    {"MLFLOW_TRACKING_USERNAME": "mallory", "MLFLOW_TRACKING_PASSWORD": PASSWORD},
    {"MLFLOW_TRACKING_TOKEN": "ryt_" + "x" * 43},
], ids=["no-credentials", "wrong-password", "unknown-user", "made-up-token"])
def test_refused_credentials_write_nothing(gateway, monkeypatch, env):
    gw = gateway("basic+token")
    run_id = _open_run(gw)
    _writes_nothing(gw, _connect(monkeypatch, gw, **env), run_id)


def test_revoked_token_is_refused_at_once(gateway, monkeypatch):
    gw = gateway("token")
    result = run_cli("tokens", "create", "--name", "laptop", "--backend-store-uri", gw.server.backend_uri)
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_TOKEN=result.stdout.strip())
    run_id = client.create_run("0").info.run_id
    revoked = run_cli("tokens", "revoke", "laptop", "--backend-store-uri", gw.server.backend_uri)
    assert revoked.returncode == 0, revoked.stderr
    _writes_nothing(gw, client, run_id)


def test_expired_token_is_refused(gateway, monkeypatch):
    gw = gateway("token")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_TOKEN=gw.token("--expires", "3s"))
    run_id = client.create_run("0").info.run_id
    time.sleep(3.2)
    _writes_nothing(gw, client, run_id)


def _concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: "a/b.txt" if m.group(2) else "x1", path)


@pytest.mark.parametrize("prefix", ["", "/mlflow"])
def test_every_route_requires_credentials_except_the_probes(gateway, prefix):
    gw = gateway("basic+token", prefix=prefix, login_rate="1000r/s")  # this test is all failed logins
    base = gw.url
    checked = 0
    for route in all_routes():
        for path in route.full_paths():
            for method in route.methods:
                url = base + _concrete(path)
                answers = [requests.request(method, url, timeout=30, **extra) for extra in (
                    {}, {"auth": (USER, "wrong")}, {"headers": {"Authorization": "Bearer ryt_nope"}},
                    {"headers": {"X-Forwarded-User": USER}})]
                if path in ("/health", "/ready"):  # probes
                    assert [a.status_code for a in answers] == [200] * 4
                    continue
                if path.startswith("/_runyard/"):  # the server's internal endpoints: not even there
                    assert [a.status_code for a in answers] == [404] * 4
                    continue
                assert [a.status_code for a in answers] == [401] * 4, (method, url)
                assert all(a.headers["www-authenticate"] for a in answers)
                checked += 1
    assert checked >= 60  # every JSON, artifact and internal route of the server
    assert requests.get(base + "/version", auth=(USER, PASSWORD), timeout=30).status_code == 200


def test_static_prefix(gateway, monkeypatch, tmp_path):
    gw = gateway("basic+token", prefix="/mlflow")
    client = _connect(monkeypatch, gw, MLFLOW_TRACKING_TOKEN=gw.token())
    exp_id = client.create_experiment(f"prefixed-{uuid.uuid4().hex[:6]}")
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    artifact = tmp_path / "notes.txt"
    artifact.write_text("under a prefix\n")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}
    local = client.download_artifacts(run.info.run_id, "notes.txt", str(tmp_path / "back"))
    assert Path(local).read_text() == "under a prefix\n"
    root = gw.url.removesuffix("/mlflow")
    assert requests.get(f"{gw.url}/health", timeout=30).status_code == 200
    # Outside the prefix there is nothing, with or without credentials.
    assert requests.get(f"{root}/api/2.0/mlflow/experiments/search", auth=(USER, PASSWORD),
                        timeout=30).status_code == 404


def test_a_client_cannot_claim_another_user(gateway):
    gw = gateway("basic")
    answer = requests.post(f"{gw.url}/api/2.0/mlflow/runs/create", json={"experiment_id": "0"},
                           auth=(USER, PASSWORD), headers={"X-Forwarded-User": "mallory"}, timeout=30)
    run = answer.json()["run"]
    assert run["info"]["user_id"] == USER
    assert f"user={USER}" in gw.server.log() and "mallory" not in gw.server.log()
