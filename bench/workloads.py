"""The workloads. Each takes one server (a Target) and returns the numbers it measured.

Every workload does its untimed set-up and warm-up first, then a timed loop bounded both in count and
in time (`Sizes.max_seconds`), so a slow server shortens the loop instead of the whole run. Request
bodies are encoded before the clock starts: the figures should describe the server, not our encoder.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from time import perf_counter
from urllib.parse import urlparse

try:  # the project venv has orjson; parsing 100k history points with it keeps client cost small
    import orjson as _fastjson

    def parse(content: bytes):
        return _fastjson.loads(content)
except ImportError:  # pragma: no cover - only outside the project venv
    import json as _fastjson

    def parse(content: bytes):
        return _fastjson.loads(content)

from bench.rest import ApiError, Rest, create_run_body, encode, now_ms, with_retries
from bench.servers import Server
from bench.sizes import Sizes

MB = 2**20


@dataclass
class Target:
    """One server under test, as the workloads see it."""
    name: str
    server: Server
    rest: Rest
    experiment_id: str
    scratch: Path          # where the big artifact file is kept


@dataclass
class Outcome:
    values: dict[str, float]
    signature: object = None           # compared across servers; a difference becomes a warning
    notes: list[str] = field(default_factory=list)


def timed(send, items, max_seconds: float) -> tuple[list[float], float]:
    """Send items one by one; per-call latencies (s) and total elapsed (s). Stops early at the cap."""
    latencies = []
    start = perf_counter()
    deadline = start + max_seconds
    for item in items:
        t0 = perf_counter()
        send(item)
        t1 = perf_counter()
        latencies.append(t1 - t0)
        if t1 >= deadline:
            break
    return latencies, perf_counter() - start


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile; good enough for thousands of samples and has no interpolation surprises."""
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_values(prefix: str, latencies: list[float], elapsed: float) -> dict[str, float]:
    ms = [x * 1000 for x in latencies]
    return {
        f"{prefix}.rate": len(latencies) / elapsed,
        f"{prefix}.mean_ms": fmean(ms),
        f"{prefix}.p50_ms": percentile(ms, 50),
        f"{prefix}.p99_ms": percentile(ms, 99),
        f"{prefix}.count": len(latencies),
    }


def new_run(t: Target, name: str, experiment_id: str | None = None) -> dict:
    body = create_run_body(experiment_id or t.experiment_id, name)
    return t.rest.post("/runs/create", body)["run"]["info"]


def seed(t: Target, sizes: Sizes, tasks: list, work) -> None:
    """Run `work(rest, task)` for every task over several keep-alive connections (untimed set-up)."""
    local = threading.local()
    clients: list[Rest] = []
    lock = threading.Lock()
    failed = threading.Event()
    deadline = time.monotonic() + sizes.seed_max_seconds

    def one(task):
        if failed.is_set():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"seeding did not finish within {sizes.seed_max_seconds:.0f}s")
        rest = getattr(local, "rest", None)
        if rest is None:
            rest = local.rest = Rest(t.rest.base)
            with lock:
                clients.append(rest)
        with_retries(lambda: work(rest, task))

    try:
        with ThreadPoolExecutor(sizes.seed_threads) as pool:
            futures = [pool.submit(one, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                failed.set()  # the first failure ends the seeding; queued tasks return at once
                for future in futures:
                    future.cancel()
                raise
    finally:
        for rest in clients:
            rest.close()


# 1. create run ----------------------------------------------------------------------------------

def create_run(t: Target, sizes: Sizes) -> Outcome:
    for i in range(20):
        new_run(t, f"warmup-{i}")
    bodies = [encode(create_run_body(t.experiment_id, f"bench-run-{i}")) for i in range(sizes.create_runs)]
    latencies, elapsed = timed(lambda b: t.rest.post_raw("/runs/create", b), bodies, sizes.max_seconds)
    return Outcome(latency_values("create_run", latencies, elapsed))


# 2. single log-metric ---------------------------------------------------------------------------

def log_metric(t: Target, sizes: Sizes) -> Outcome:
    run_id = new_run(t, "log-metric")["run_id"]

    def body(key: str, step: int) -> bytes:
        # field order as the stock client sends it (api-notes §2.3)
        return encode({"run_uuid": run_id, "key": key, "value": step * 0.001, "timestamp": now_ms(),
                       "step": step, "run_id": run_id})

    for i in range(50):
        t.rest.post_raw("/runs/log-metric", body("warmup", i))
    bodies = [body("loss", i) for i in range(sizes.log_metrics)]
    latencies, elapsed = timed(lambda b: t.rest.post_raw("/runs/log-metric", b), bodies, sizes.max_seconds)
    return Outcome(latency_values("log_metric", latencies, elapsed))


# 3. log-batch of 1000 metrics -------------------------------------------------------------------

def batch_body(run_id: str, first_step: int, n: int, keys: list[str]) -> bytes:
    """`n` metrics spread over `keys`, each key with its own steps, as `log_metrics(..., step=s)` sends."""
    ts = now_ms()
    steps = n // len(keys)
    metrics = [{"key": k, "value": (first_step + s) * 0.5, "timestamp": ts + s, "step": first_step + s,
                "run_id": run_id}
               for s in range(steps) for k in keys]
    return encode({"run_id": run_id, "metrics": metrics})


def log_batch(t: Target, sizes: Sizes) -> Outcome:
    run_id = new_run(t, "log-batch")["run_id"]
    keys = [f"m{i}" for i in range(10)]
    per_key = sizes.batch_metrics // len(keys)
    for i in range(2):
        # warm-up points go to their own key, so they never collide with the timed ones
        warm = batch_body(run_id, i * sizes.batch_metrics, sizes.batch_metrics, ["warmup"])
        t.rest.post_raw("/runs/log-batch", warm)
    bodies = [batch_body(run_id, i * per_key, sizes.batch_metrics, keys) for i in range(sizes.log_batches)]
    latencies, elapsed = timed(lambda b: t.rest.post_raw("/runs/log-batch", b), bodies, sizes.max_seconds)
    values = latency_values("log_batch", latencies, elapsed)
    values["log_batch.metrics_per_s"] = values["log_batch.rate"] * sizes.batch_metrics
    return Outcome(values)


# 4. search over N runs --------------------------------------------------------------------------

MODELS = ["cnn", "mlp", "rnn", "transformer"]
SEARCH = {"filter": "metrics.loss < 0.5 and params.model = 'cnn'", "order_by": ["metrics.acc DESC"],
          "max_results": 1000}


def search_rows(n: int) -> list[dict]:
    """The same seeded data for every server. `acc` is unique, so the ordering has no ties and the
    first run names must agree across servers (run ids are server-generated and cannot)."""
    rng = random.Random(20240601)
    ranks = list(range(n))
    rng.shuffle(ranks)
    rows = []
    for i in range(n):
        rows.append({
            "name": f"seed-{i:05d}",
            "params": {"model": rng.choice(MODELS), "lr": f"{rng.choice([1e-4, 3e-4, 1e-3, 3e-3])}",
                       "batch_size": str(rng.choice([16, 32, 64, 128])),
                       "optimizer": rng.choice(["adam", "sgd"]), "layers": str(rng.randint(1, 12))},
            "tags": {"team": rng.choice(["vision", "nlp", "tabular"]), "stage": rng.choice(["dev", "prod"]),
                     "dataset": f"ds-{rng.randint(1, 20)}", "owner": f"user{rng.randint(1, 9)}",
                     "note": "seeded by bench"},
            "metrics": {"loss": round(rng.random(), 6), "acc": round((ranks[i] + 0.5) / n, 9),
                        "f1": round(rng.random(), 6)},
        })
    return rows


def expected_search(rows: list[dict]) -> tuple[int, list[str]]:
    hits = [r for r in rows if r["metrics"]["loss"] < 0.5 and r["params"]["model"] == "cnn"]
    hits.sort(key=lambda r: -r["metrics"]["acc"])
    return min(len(hits), SEARCH["max_results"]), [r["name"] for r in hits[:10]]


def search(t: Target, sizes: Sizes) -> Outcome:
    name = f"bench-search-{uuid.uuid4().hex[:8]}"
    exp_id = t.rest.post("/experiments/create", {"name": name})["experiment_id"]
    rows = search_rows(sizes.search_runs)

    def add_run(rest: Rest, row: dict) -> None:
        tags = [{"key": k, "value": v} for k, v in row["tags"].items()]
        run = rest.post("/runs/create", create_run_body(exp_id, row["name"], tags))["run"]
        run_id, ts = run["info"]["run_id"], now_ms()
        rest.post("/runs/log-batch", {
            "run_id": run_id,
            "metrics": [{"key": k, "value": v, "timestamp": ts, "step": 0}
                        for k, v in row["metrics"].items()],
            "params": [{"key": k, "value": v} for k, v in row["params"].items()],
        })

    seed(t, sizes, rows, add_run)

    body = encode({"experiment_ids": [exp_id], **SEARCH})
    first = parse(t.rest.post_raw("/runs/search", body).content)
    t.rest.post_raw("/runs/search", body)  # second warm-up call
    runs = first.get("runs", [])
    signature = (len(runs), [r["info"].get("run_name") for r in runs[:10]])
    notes = []
    if signature != expected_search(rows):
        notes.append(f"{t.name}: search returned {signature[0]} runs, first {signature[1][:3]}; "
                     f"expected {expected_search(rows)[0]}, first {expected_search(rows)[1][:3]}")
    latencies, elapsed = timed(lambda b: t.rest.post_raw("/runs/search", b), [body] * sizes.searches,
                               sizes.max_seconds)
    values = latency_values("search", latencies, elapsed)
    values["search.matched"] = signature[0]
    return Outcome(values, signature=signature, notes=notes)


# 5. metric history ------------------------------------------------------------------------------

def fetch_history(rest: Rest, run_id: str, key: str, max_pages: int = 1000) -> int:
    """The full history the way the client pages it (max_results=25000, follow next_page_token)."""
    url = rest.base + "/api/2.0/mlflow/metrics/get-history"
    params = {"run_uuid": run_id, "metric_key": key, "run_id": run_id, "max_results": 25000}
    points = 0
    for _ in range(max_pages):
        resp = rest.session.get(url, params=params, timeout=120)
        if resp.status_code != 200:
            raise ApiError(f"GET /metrics/get-history -> {resp.status_code}: {resp.text[:300]}")
        page = parse(resp.content) if resp.content.strip() else {}
        points += len(page.get("metrics", ()))
        token = page.get("next_page_token")
        if not token:
            return points
        params["page_token"] = token
    raise ApiError(f"get-history still paging after {max_pages} pages")


def history(t: Target, sizes: Sizes) -> Outcome:
    run_id = new_run(t, "history")["run_id"]
    per_batch = 1000
    starts = list(range(0, sizes.history_points, per_batch))

    def add_batch(rest: Rest, first: int) -> None:
        n = min(per_batch, sizes.history_points - first)
        rest.post_raw("/runs/log-batch", batch_body(run_id, first, n, ["loss"]))

    seed(t, sizes, starts, add_batch)
    got = fetch_history(t.rest, run_id, "loss")  # warm-up, and the correctness check
    notes = []
    if got != sizes.history_points:
        notes.append(f"{t.name}: history returned {got} points, expected {sizes.history_points}")
    counts = []
    latencies, elapsed = timed(lambda _: counts.append(fetch_history(t.rest, run_id, "loss")),
                               range(sizes.history_fetches), sizes.max_seconds)
    if any(c != got for c in counts):
        notes.append(f"{t.name}: history point counts changed between fetches: {sorted(set(counts))}")
    values = latency_values("history", latencies, elapsed)
    values["history.points"] = got
    return Outcome(values, signature=got, notes=notes)


# 6 + 7. artifacts through the proxy, with server memory sampled meanwhile -----------------------

def big_file(scratch: Path, mb: int) -> Path:
    path = scratch / f"big-{mb}mb.bin"
    if not path.exists() or path.stat().st_size != mb * MB:
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            # incompressible, so no layer can cheat with compression
            f.writelines(random.randbytes(MB) for _ in range(mb))
        tmp.replace(path)
    return path


def artifact_root(t: Target, info: dict) -> tuple[str, list[str]]:
    """The proxy path of the run's artifacts, read from artifact_uri as the client does."""
    uri = info.get("artifact_uri", "")
    if uri.startswith("mlflow-artifacts:"):
        return urlparse(uri).path.lstrip("/"), []
    fallback = f"{info['experiment_id']}/{info['run_id']}/artifacts"
    return fallback, [f"{t.name}: artifact_uri {uri!r} is not proxied; used {fallback}"]


class RssSampler(threading.Thread):
    """Samples the server tree's RSS every 20 ms until stopped; keeps the peak."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        self.peak = server.rss_mb()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            self.peak = max(self.peak, self.server.rss_mb())

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return max(self.peak, self.server.rss_mb())


def upload(rest: Rest, rel: str, path: Path) -> None:
    with open(path, "rb") as f:  # a file object: requests streams it with a Content-Length, like the client
        resp = rest.session.put(rest.artifact_url(rel), data=f,
                                headers={"Content-Type": "application/octet-stream"}, timeout=300)
    if resp.status_code != 200:
        raise ApiError(f"PUT artifact -> {resp.status_code}: {resp.text[:300]}")


def download(rest: Rest, rel: str) -> int:
    size = 0
    with rest.session.get(rest.artifact_url(rel), stream=True, timeout=300) as resp:
        if resp.status_code != 200:
            raise ApiError(f"GET artifact -> {resp.status_code}: {resp.text[:300]}")
        for chunk in resp.iter_content(chunk_size=MB):
            size += len(chunk)
    return size


def artifacts(t: Target, sizes: Sizes) -> Outcome:
    info = new_run(t, "artifacts")
    root, notes = artifact_root(t, info)
    path = big_file(t.scratch, sizes.artifact_mb)
    small = big_file(t.scratch, 1)
    upload(t.rest, f"{root}/warmup.bin", small)
    if download(t.rest, f"{root}/warmup.bin") != MB:
        raise ApiError("warm-up download returned the wrong size")

    time.sleep(0.5)  # let the server settle before the baseline
    before = t.server.rss_mb()
    sampler = RssSampler(t.server)
    sampler.start()
    up_s = down_s = 0.0
    try:
        for i in range(sizes.artifact_repeats):
            rel = f"{root}/big.bin" if i == 0 else f"{root}/big-{i}.bin"
            t0 = perf_counter()
            upload(t.rest, rel, path)
            t1 = perf_counter()
            got = download(t.rest, rel)
            t2 = perf_counter()
            if got != path.stat().st_size:
                raise ApiError(f"download of {rel} returned {got} bytes, expected {path.stat().st_size}")
            up_s += t1 - t0
            down_s += t2 - t1
    finally:
        peak = sampler.stop()
    total_mb = sizes.artifact_mb * sizes.artifact_repeats
    growth = peak - before
    if growth > sizes.artifact_mb / 2:
        notes.append(f"{t.name}: RSS grew {growth:.0f} MB while moving a {sizes.artifact_mb} MB file "
                     "(memory is not flat)")
    return Outcome({
        "artifacts.upload_mbps": total_mb / up_s,
        "artifacts.download_mbps": total_mb / down_s,
        "rss.before_mb": before,
        "rss.peak_mb": peak,
        "rss.growth_mb": growth,
    }, notes=notes)


WORKLOADS = {
    "create_run": create_run,
    "log_metric": log_metric,
    "log_batch": log_batch,
    "search": search,
    "history": history,
    "artifacts": artifacts,
}
