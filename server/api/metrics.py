"""Metric history routes: the full history the client pages through, and the sampled histories of
many runs that charts ask for."""

from __future__ import annotations

from server.api.message import Message
from server.api.routing import json_route
from server.api.runs import run_id_of
from server.errors import invalid

MAX_RUNS_PER_BULK_REQUEST = 100
MAX_POINTS_PER_RUN = 2500


def get_history(msg: Message, ctx) -> dict:
    return ctx.store.get_metric_history(run_id_of(msg), msg.str("metric_key", required=True),
                                        msg.int("max_results"), msg.str("page_token"))


def _bulk_run_ids(msg: Message, field: str) -> list[str]:
    run_ids = msg.str_list(field)
    if not run_ids:
        raise Message.missing(field)
    if len(run_ids) > MAX_RUNS_PER_BULK_REQUEST:
        raise invalid(f"GetMetricHistoryBulkInterval request must specify at most "
                      f"{MAX_RUNS_PER_BULK_REQUEST} run_ids. Received {len(run_ids)} run_ids.")
    return run_ids


def get_history_bulk_interval(msg: Message, ctx) -> dict:
    run_ids = _bulk_run_ids(msg, "run_ids")
    max_results = msg.int("max_results", default=MAX_POINTS_PER_RUN)
    if not 1 <= max_results <= MAX_POINTS_PER_RUN:
        raise invalid(f"max_results must be between 1 and {MAX_POINTS_PER_RUN}.")
    start, end = msg.int("start_step"), msg.int("end_step")
    if (start is None) != (end is None):
        raise invalid("If either start step or end step are specified, both must be specified.")
    if start is not None and start > end:
        raise invalid(f"end_step must be greater than start_step. Found start_step={start} and "
                      f"end_step={end}.")
    points = ctx.store.get_metric_history_sampled(run_ids, msg.str("metric_key", required=True),
                                                  max_results, start, end)
    return {"metrics": points} if points else {}


def get_history_bulk(msg: Message, ctx) -> dict:
    """UI-only: whole histories of several runs, `max_results` points in all."""
    run_ids = _bulk_run_ids(msg, "run_id")
    key = msg.str("metric_key", required=True)
    limit = msg.int("max_results", default=25000)
    points = []
    for run_id in run_ids:
        history = ctx.store.get_metric_history(run_id, key, None, None).get("metrics", [])
        points.extend(point | {"run_id": run_id} for point in history)
    points = points[:max(limit, 0)]
    return {"metrics": points} if points else {}


ROUTES = [
    json_route("GET", "/mlflow/metrics/get-history", get_history),
    json_route("GET", "/mlflow/metrics/get-history-bulk-interval", get_history_bulk_interval),
    json_route("GET", "/mlflow/metrics/get-history-bulk", get_history_bulk),
]
