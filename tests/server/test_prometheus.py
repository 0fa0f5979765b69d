"""`--expose-prometheus DIR`: GET /metrics in the Prometheus text format, with every worker's counts in
one scrape; route templates (never raw paths) as labels; log-batch sizes, artifact bytes through the proxy
and the database pool. Without the flag /metrics does not exist."""

from __future__ import annotations

import glob
import os
import threading
import uuid
from collections import defaultdict

import pytest
import requests
from helpers.ports import wait_for
from helpers.servers import start_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from server.config import ServerConfig

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
POOL_SIZE = 3  # RUNYARD_DB_POOL_SIZE of the server below, per worker
WORKERS = 2


@pytest.fixture(scope="module")
def prom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prom") / "multiproc"  # missing: the server creates it
    return folder


@pytest.fixture(scope="module")
def prom_server(tmp_path_factory, prom_dir):
    running = start_server(tmp_path_factory.mktemp("server"), None, "--expose-prometheus", str(prom_dir),
                           workers=WORKERS, env={"RUNYARD_DB_POOL_SIZE": str(POOL_SIZE)})
    yield running
    running.stop()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    r = requests.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def settled(server, done) -> dict:
    """A scrape for which `done(samples)` holds, waiting a little: a worker counts a request right after
    its last byte went out, so the client can be a moment ahead of the count."""
    box = {}

    def check() -> bool:
        box["samples"] = scrape(server)
        return done(box["samples"])

    wait_for(check, timeout=10, interval=0.1)
    return box["samples"]


def new_run(base: str) -> str:
    exp = requests.post(f"{base}{API}/experiments/create", json={"name": f"p-{uuid.uuid4().hex}"}, timeout=30)
    run = requests.post(f"{base}{API}/runs/create", json={"experiment_id": exp.json()["experiment_id"]},
                        timeout=30)
    return run.json()["run"]["info"]["run_id"]


def per_worker_counts(folder, route: str) -> dict[str, float]:
    """{counter file: requests to `route` it holds}: which worker processes served them."""
    counts = defaultdict(float)
    for path in glob.glob(os.path.join(folder, "counter_*.db")):
        for family in MultiProcessCollector.merge([path], accumulate=True):
            for sample in family.samples:
                if sample.name == "runyard_http_requests_total" and sample.labels.get("route") == route:
                    counts[path] += sample.value
    return counts


def test_metrics_is_not_a_route_without_the_flag(server):
    r = requests.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 404
    assert r.json()["error_code"] == "ENDPOINT_NOT_FOUND"


def test_requests_over_both_workers_are_counted_in_one_scrape(prom_server, prom_dir):
    route = f"{API}/experiments/get"
    sent = 0
    lock = threading.Lock()

    def burst() -> None:
        nonlocal sent
        for _ in range(10):  # a new connection each: the kernel hands them to either worker
            r = requests.get(f"{prom_server.url}{route}", params={"experiment_id": "0"}, timeout=30,
                             headers={"connection": "close"})
            assert r.status_code == 200
            with lock:
                sent += 1

    def both_workers_served() -> bool:
        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len([n for n in per_worker_counts(prom_dir, route).values() if n]) == WORKERS

    assert wait_for(both_workers_served, timeout=60, interval=0)
    samples = settled(prom_server, lambda s: value(
        s, "runyard_http_request_duration_seconds_count", route=route, method="GET") >= sent)
    assert value(samples, "runyard_http_requests_total", route=route, method="GET", status="200") == sent
    assert value(samples, "runyard_http_request_duration_seconds_count", route=route, method="GET") == sent
    assert value(samples, "runyard_http_request_duration_seconds_bucket", route=route, method="GET",
                 le="60.0") == sent
    assert value(samples, "runyard_http_request_duration_seconds_bucket", route=route, method="GET",
                 le="+Inf") == sent


def test_labels_are_route_templates_not_paths(prom_server):
    model_id = f"m-{uuid.uuid4().hex}"
    missing = requests.get(f"{prom_server.url}{API}/logged-models/{model_id}", timeout=30)
    assert missing.status_code == 404
    nowhere = f"/no/such/{uuid.uuid4().hex}"
    assert requests.get(f"{prom_server.url}{nowhere}", timeout=30).status_code == 404
    assert requests.request("PROPFIND", f"{prom_server.url}{nowhere}", timeout=30).status_code == 404
    r = requests.get(f"{prom_server.url}/metrics", timeout=30)
    assert model_id not in r.text and nowhere not in r.text
    samples = settled(prom_server, lambda s: value(s, "runyard_http_requests_total", route="unmatched",
                                                   method="OTHER", status="404") >= 1)
    assert value(samples, "runyard_http_requests_total", route=f"{API}/logged-models/{{model_id}}",
                 method="GET", status="404") >= 1
    assert value(samples, "runyard_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert value(samples, "runyard_http_requests_total", route="unmatched", method="OTHER",
                 status="404") >= 1


def test_log_batch_sizes(prom_server):
    run_id = new_run(prom_server.url)
    before = scrape(prom_server)
    batch = {
        "run_id": run_id,
        "metrics": [{"key": f"k{i}", "value": i, "timestamp": 1, "step": 0} for i in range(7)],
        "params": [{"key": f"p{i}", "value": "v"} for i in range(3)],
        "tags": [{"key": f"t{i}", "value": "v"} for i in range(2)],
    }
    assert requests.post(f"{prom_server.url}{API}/runs/log-batch", json=batch, timeout=30).status_code == 200
    refused = requests.post(f"{prom_server.url}{API}/runs/log-batch", timeout=30,
                            json={"run_id": run_id, "metrics": [{"key": "x"}]})
    assert refused.status_code == 400  # a refused batch wrote nothing and is not counted
    after = scrape(prom_server)
    for kind, size, bucket in (("metrics", 7, "10.0"), ("params", 3, "5.0"), ("tags", 2, "5.0")):
        for name, grew_by in (("runyard_log_batch_size_count", 1), ("runyard_log_batch_size_sum", size)):
            assert value(after, name, kind=kind) - value(before, name, kind=kind) == grew_by, (name, kind)
        bucket_name = "runyard_log_batch_size_bucket"
        assert value(after, bucket_name, kind=kind, le=bucket) - value(before, bucket_name, kind=kind,
                                                                        le=bucket) == 1


def test_artifact_bytes_in_and_out(prom_server):
    payload = os.urandom(5 * 1024 * 1024 + 17)  # more than one flush of the running count
    path = f"{ARTIFACTS}/{uuid.uuid4().hex}/model.bin"
    before = scrape(prom_server)
    assert requests.put(f"{prom_server.url}{path}", data=payload, timeout=60).status_code == 200
    got = requests.get(f"{prom_server.url}{path}", timeout=60)
    assert got.content == payload
    part = requests.get(f"{prom_server.url}{path}", headers={"range": "bytes=100-199"}, timeout=60)
    assert part.status_code == 206 and part.content == payload[100:200]

    def grew(samples, direction: str) -> float:
        name = "runyard_artifact_bytes_total"
        return value(samples, name, direction=direction) - value(before, name, direction=direction)

    after = settled(prom_server, lambda s: grew(s, "out") >= len(payload) + 100)
    assert grew(after, "in") == len(payload)
    assert grew(after, "out") == len(payload) + 100


def test_database_pool_gauges(prom_server):
    samples = scrape(prom_server)
    # livesum: the pools of both workers together
    assert value(samples, "runyard_db_pool_size") == POOL_SIZE * WORKERS
    assert value(samples, "runyard_db_pool_max") == 2 * POOL_SIZE * WORKERS
    assert ("runyard_db_pool_checked_out", ()) in samples
    assert 0 <= value(samples, "runyard_db_pool_checked_out") <= 2 * POOL_SIZE * WORKERS


def test_stale_files_are_cleared_at_start(tmp_path, server_factory):
    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"left over from an earlier run")
    (folder / "keep.txt").write_text("not ours")
    server = server_factory(None, "--expose-prometheus", str(folder))
    assert not (folder / "counter_999999.db").exists()
    assert (folder / "keep.txt").exists()
    samples = scrape(server)
    assert value(samples, "runyard_http_requests_total", route="/health", method="GET", status="200") >= 1
    assert requests.get(f"{server.url}/metrics", timeout=30).headers["cache-control"] == "no-store"


def test_config_validates_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ServerConfig(expose_prometheus="prom").expose_prometheus == str(tmp_path / "prom")
    assert ServerConfig().expose_prometheus is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        ServerConfig(expose_prometheus="file")
    with pytest.raises(ValueError, match="needs a folder"):
        ServerConfig(expose_prometheus=" ")
    config = ServerConfig(expose_prometheus="prom")
    assert ServerConfig.from_env({"RUNYARD_SERVER_CONFIG": config.to_env()}) == config
