"""Prometheus metrics, on with `--expose-prometheus DIR`: `GET /metrics` in the Prometheus text format.

(Not to be confused with `server/api/metrics.py`, MLflow's metric-history API.)

Several `--workers` report together through prometheus-client's multiprocess mode: every worker process
writes its values to memory-mapped files in DIR and a scrape, whichever worker answers it, merges the
files of all. `prepare_directory` runs once in the parent process before any worker starts: it creates
DIR and removes the files an earlier run left there (their counts would otherwise be added to ours).

What is measured (all names start with `runyard_`):
- `http_requests_total{route,method,status}` and `http_request_duration_seconds{route,method}`: `route`
  is the router's template (`/api/2.0/mlflow/logged-models/{model_id}`), never the raw path ("unmatched"
  for paths no route serves), and an unknown method is counted as OTHER: clients cannot create series;
- `db_pool_checked_out`, `db_pool_size`, `db_pool_max`: connections in use, kept open, and the ceiling
  (overflow included), summed over live workers; sampled every second and at each scrape, so requests
  pay nothing for them;
- `artifact_bytes_total{direction=in|out}`: bytes through the artifact proxy (uploads in, downloads out);
- `log_batch_size{kind=metrics|params|tags}`: the sizes of `runs/log-batch` requests.

Without the flag nothing here is imported and the app makes no metric call at all (decided once, when
the app is built).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator

from server.errors import RunyardError

log = logging.getLogger("runyard.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where prometheus-client's multiprocess values live
# 1 ms to 60 s: a metric write is ~1 ms, a large search or a slow artifact store tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# MLflow's limits: 1000 metrics, 100 params, 100 tags, 1000 items in all per batch.
BATCH_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
POOL_SAMPLE_INTERVAL_S = 1.0
BYTES_FLUSH = 4 * 1024 * 1024  # a long transfer shows up as it goes, not only when it ends


def prepare_directory(folder: str) -> None:
    """Creates `folder` when missing and removes the metric files of an earlier run. Call it once, in
    the process that starts the workers, before any of them runs; it also points the workers there."""
    try:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, "*.db")):
            os.remove(stale)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise RunyardError(f"--expose-prometheus {folder}: {exc.strerror or exc}", "INVALID_STATE") from None
    os.environ[MULTIPROC_ENV] = folder  # inherited by the worker processes


class ByteTally:
    """Bytes of one transfer, added to the shared counter every few MiB and at the end: per chunk costs
    one addition, and a long transfer still shows up while it runs."""

    __slots__ = ("counter", "pending")

    def __init__(self, counter):
        self.counter = counter
        self.pending = 0

    def add(self, count: int) -> None:
        self.pending += count
        if self.pending >= BYTES_FLUSH:
            self.counter.inc(self.pending)
            self.pending = 0

    def close(self) -> None:
        if self.pending:
            self.counter.inc(self.pending)
            self.pending = 0


class PrometheusMetrics:
    """The metrics of one server process, written to the shared multiprocess folder."""

    def __init__(self, folder: str):
        from prometheus_client import Counter, Gauge, Histogram, values

        self.folder = folder
        # prometheus-client picks its value store from the environment when first imported and opens
        # files in the folder the variable names; set both here, before the first metric exists.
        os.environ[MULTIPROC_ENV] = folder
        values.ValueClass = values.MultiProcessValue()
        self.requests = Counter("runyard_http_requests",
                                "HTTP requests by route template, method and status.",
                                ("route", "method", "status"), registry=None)
        self.latency = Histogram("runyard_http_request_duration_seconds",
                                 "Time to answer a request (body included), by route template and method.",
                                 ("route", "method"), buckets=LATENCY_BUCKETS, registry=None)
        artifact_bytes = Counter("runyard_artifact_bytes",
                                 "Bytes through the artifact proxy: in = uploads, out = downloads.",
                                 ("direction",), registry=None)
        self.bytes_in, self.bytes_out = artifact_bytes.labels("in"), artifact_bytes.labels("out")
        batch = Histogram("runyard_log_batch_size", "Items per runs/log-batch request, by kind.", ("kind",),
                          buckets=BATCH_BUCKETS, registry=None)
        self.batch_metrics, self.batch_params, self.batch_tags = (
            batch.labels("metrics"), batch.labels("params"), batch.labels("tags"))
        self.pool_checked_out = Gauge("runyard_db_pool_checked_out",
                                      "Database connections in use, summed over live workers.",
                                      multiprocess_mode="livesum", registry=None)
        self.pool_size = Gauge("runyard_db_pool_size",
                               "Database connections each pool keeps open, summed over live workers.",
                               multiprocess_mode="livesum", registry=None)
        self.pool_max = Gauge("runyard_db_pool_max",
                              "Database connections the pools may open at most (overflow included), summed "
                              "over live workers.", multiprocess_mode="livesum", registry=None)
        self._children: dict[tuple[str, str, int], tuple] = {}
        self._pool = None
        self._sampler: asyncio.Task | None = None

    # -- requests (called by the app, on the event loop) -------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # once per (route, method, status): bounded by the route table
            children = self._children[key] = (self.requests.labels(route, method, str(status)),
                                              self.latency.labels(route, method))
        children[0].inc()
        children[1].observe(seconds)

    # -- runs/log-batch (called in worker threads) -------------------------------------------------

    def observe_batch(self, metrics: int, params: int, tags: int) -> None:
        self.batch_metrics.observe(metrics)
        self.batch_params.observe(params)
        self.batch_tags.observe(tags)

    # -- artifact proxy ----------------------------------------------------------------------------

    def tally(self, direction: str) -> ByteTally:
        """A running count of one transfer's bytes; direction "in" (upload) or "out" (download)."""
        return ByteTally(self.bytes_in if direction == "in" else self.bytes_out)

    async def count_in(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """`chunks` passed through, their bytes counted as uploaded (also when the client gives up)."""
        tally = self.tally("in")
        try:
            async for chunk in chunks:
                tally.add(len(chunk))
                yield chunk
        finally:
            tally.close()

    # -- the database pool -------------------------------------------------------------------------

    def watch_pool(self, engine) -> None:
        """Reports `engine`'s pool from now on: its size now, its use every second (see `start`)."""
        pool = engine.pool
        if not hasattr(pool, "checkedout"):
            return
        self._pool = pool
        size = pool.size() if hasattr(pool, "size") else 0
        overflow = getattr(pool, "_max_overflow", 0)
        self.pool_size.set(size)
        self.pool_max.set(size + max(overflow, 0))
        self.sample_pool()

    def sample_pool(self) -> None:
        if self._pool is not None:
            self.pool_checked_out.set(self._pool.checkedout())

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(POOL_SAMPLE_INTERVAL_S)
            self.sample_pool()

    def start(self) -> None:
        """Starts sampling the pool (call on the event loop, at lifespan start-up)."""
        if self._pool is not None and self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    def stop(self) -> None:
        """Stops sampling and withdraws this process's gauges (its counters stay in the sums)."""
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(os.getpid(), self.folder)
        except OSError as exc:  # the folder went away: nothing left to withdraw
            log.warning("--expose-prometheus: cannot remove this worker's gauges: %s", exc.strerror)

    # -- the scrape --------------------------------------------------------------------------------

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Every worker's values merged, in the format `accept` asks for (blocking: reads files)."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder
        from prometheus_client.multiprocess import MultiProcessCollector

        self.sample_pool()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.folder)
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    def routes(self) -> list:
        """GET /metrics, unprefixed like /health (the app strips --static-prefix itself)."""
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        from server.api.routing import raw_route

        async def scrape(request, ctx):
            body, content_type = await run_in_threadpool(self.render, request.headers.get("accept"))
            return Response(body, media_type=content_type, headers={"cache-control": "no-store"})

        return [raw_route("GET", "/metrics", scrape, prefixed=False)]
