"""Metric history routes."""

from __future__ import annotations

from server.api.message import Message
from server.api.routing import json_route
from server.api.runs import run_id_of


def get_history(msg: Message, ctx) -> dict:
    return ctx.store.get_metric_history(run_id_of(msg), msg.str("metric_key", required=True),
                                        msg.int("max_results"), msg.str("page_token"))


ROUTES = [
    json_route("GET", "/mlflow/metrics/get-history", get_history),
]
