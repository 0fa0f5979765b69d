"""The stock `mlflow` client logs, lists and downloads artifacts through a real `runyard server` whose
proxied destination is each artifact store of the conformance suite (tests/helpers/stores): the client
only ever sees `mlflow-artifacts:/…`, the server talks to the store."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import uuid
from urllib.parse import quote

import mlflow
import pytest
from helpers import databases
from helpers.bad_paths import BAD_PATHS
from helpers.stores import STORES, running
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=STORES)
def store(request, tmp_path_factory):
    try:
        with running(request.param, tmp_path_factory.mktemp(f"e2e-{request.param}")) as started:
            yield started
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


def test_client_round_trip_through_each_proxied_store(store, server_factory, tmp_path, monkeypatch):
    server = server_factory(None, "--artifacts-destination", store.root(uuid.uuid4().hex[:8]), env=store.env)
    for name, value in {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                        "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(server.url)
    client = MlflowClient(tracking_uri=server.url)

    source = tmp_path / "source"
    (source / "model" / "weights").mkdir(parents=True)
    (source / "model" / "MLmodel").write_text("flavors: {}\n")
    (source / "model" / "weights" / "w.bin").write_bytes(os.urandom(3 * 2**20 + 17))  # several chunks
    (source / "model" / "empty.txt").write_bytes(b"")
    mlflow.set_experiment(f"stores-{store.name}-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(source), artifact_path="outputs")
        mlflow.log_text("ünïcode\n", "notes/readme.md")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")

    listed = client.list_artifacts(run.info.run_id, "outputs/model")
    assert sorted((f.path, f.is_dir, f.file_size) for f in listed) == [
        ("outputs/model/MLmodel", False, 12), ("outputs/model/empty.txt", False, 0),
        ("outputs/model/weights", True, None)]

    target = tmp_path / "downloaded"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="outputs",
                                                dst_path=str(target))
    for path in ("model/MLmodel", "model/empty.txt", "model/weights/w.bin"):
        original, copy = source / path, target / "outputs" / path
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()
    assert local.endswith("outputs")
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/readme.md") == "ünïcode\n"


ROUTES = [("GET", "artifacts"), ("HEAD", "artifacts"), ("PUT", "artifacts"), ("DELETE", "artifacts"),
          ("POST", "mpu/create"), ("POST", "mpu/complete"), ("POST", "mpu/abort"), ("GET", "presigned")]


def test_bad_paths_are_refused_on_every_route_of_each_store(store, server_factory):
    """The bad-path corpus on every artifact route, raw on the wire, with each store behind the proxy:
    every one a 400, and the store keeps only what was written through good paths."""
    server = server_factory(None, "--artifacts-destination", store.root(uuid.uuid4().hex[:8]), env=store.env)
    api = "/api/2.0/mlflow-artifacts"
    assert _raw(server.port, "PUT", f"{api}/artifacts/ok/kept.txt", b"kept")[0] == 200
    body = b'{"path": "f.bin", "num_parts": 1, "upload_id": "u", "parts": []}'
    for path in BAD_PATHS:
        wire = path.replace("\x00", "%00").replace("#", "%23")  # what can travel in a request line
        for method, route in ROUTES:
            status, _ = _raw(server.port, method, f"{api}/{route}/{wire}", body)
            assert status == 400, (method, route, path, status)
        assert _raw(server.port, "GET", f"{api}/artifacts?path={quote(path, safe='')}")[0] == 400
    status, listing = _raw(server.port, "GET", f"{api}/artifacts?path=ok")
    assert status == 200 and json.loads(listing) == {"files": [{"path": "kept.txt", "is_dir": False,
                                                                "file_size": 4}]}


def _raw(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request sent byte for byte (no client-side normalisation of the path)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        connection.putheader("Content-Length", str(len(body)))
        connection.putheader("Content-Type", "application/json")
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
