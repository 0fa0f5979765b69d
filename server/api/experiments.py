"""Experiment routes: parse the message, call the store, return the response dict."""

from __future__ import annotations

from server.api.message import Message
from server.api.routing import json_route
from server.store.tracking import VIEW_TYPES


def create(msg: Message, ctx) -> dict:
    experiment_id = ctx.store.create_experiment(msg.str("name", required=True),
                                                msg.str("artifact_location"), msg.pairs("tags"))
    return {"experiment_id": experiment_id}


def get(msg: Message, ctx) -> dict:
    return {"experiment": ctx.store.get_experiment(msg.str("experiment_id", required=True))}


def get_by_name(msg: Message, ctx) -> dict:
    return {"experiment": ctx.store.get_experiment_by_name(msg.str("experiment_name", required=True))}


def search(msg: Message, ctx) -> dict:
    return ctx.store.search_experiments(
        view_type=msg.enum("view_type", VIEW_TYPES, default="ACTIVE_ONLY"),
        max_results=msg.int("max_results"),
        filter_string=msg.str("filter"),
        order_by=msg.str_list("order_by"),
        page_token=msg.str("page_token"),
    )


def delete(msg: Message, ctx) -> dict:
    ctx.store.delete_experiment(msg.str("experiment_id", required=True))
    return {}


def restore(msg: Message, ctx) -> dict:
    ctx.store.restore_experiment(msg.str("experiment_id", required=True))
    return {}


def update(msg: Message, ctx) -> dict:
    ctx.store.rename_experiment(msg.str("experiment_id", required=True), msg.str("new_name", required=True))
    return {}


def set_tag(msg: Message, ctx) -> dict:
    ctx.store.set_experiment_tag(msg.str("experiment_id", required=True), msg.str("key", required=True),
                                 msg.str("value", default=""))
    return {}


def delete_tag(msg: Message, ctx) -> dict:
    ctx.store.delete_experiment_tag(msg.str("experiment_id", required=True), msg.str("key", required=True))
    return {}


ROUTES = [
    json_route("POST", "/mlflow/experiments/create", create),
    json_route("GET", "/mlflow/experiments/get", get),
    json_route("GET", "/mlflow/experiments/get-by-name", get_by_name),
    json_route(("POST", "GET"), "/mlflow/experiments/search", search),
    json_route("POST", "/mlflow/experiments/delete", delete),
    json_route("POST", "/mlflow/experiments/restore", restore),
    json_route("POST", "/mlflow/experiments/update", update),
    json_route("POST", "/mlflow/experiments/set-experiment-tag", set_tag),
    json_route("POST", "/mlflow/experiments/delete-experiment-tag", delete_tag),
]
