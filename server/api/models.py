"""Logged-model routes (MLflow 3's `log_model` flow, model search)."""

from __future__ import annotations

from server.api.message import Message
from server.api.routing import json_route
from server.store.logged_models import MODEL_STATUSES


def create(msg: Message, ctx) -> dict:
    model = ctx.models.create(msg.str("experiment_id", required=True), msg.str("name"), msg.str("model_type"),
                              msg.str("source_run_id"), msg.pairs("params"), msg.pairs("tags"))
    return {"model": model}


def get(msg: Message, ctx) -> dict:
    return {"model": ctx.models.get(msg.str("model_id", required=True), msg.bool("allow_deleted"))}


def finalize(msg: Message, ctx) -> dict:
    status = msg.enum("status", MODEL_STATUSES)
    if status is None:
        raise Message.missing("status")
    return {"model": ctx.models.finalize(msg.str("model_id", required=True), status)}


def delete(msg: Message, ctx) -> dict:
    ctx.models.delete(msg.str("model_id", required=True))
    return {}


def set_tags(msg: Message, ctx) -> dict:
    ctx.models.set_tags(msg.str("model_id", required=True), msg.pairs("tags"))
    return {}


def delete_tag(msg: Message, ctx) -> dict:
    ctx.models.delete_tag(msg.str("model_id", required=True), msg.str("tag_key", required=True))
    return {}


def log_params(msg: Message, ctx) -> dict:
    ctx.models.log_params(msg.str("model_id", required=True), msg.pairs("params"))
    return {}


def search(msg: Message, ctx) -> dict:
    order_by = [{"field_name": o.str("field_name", required=True), "ascending": o.bool("ascending", True),
                 "dataset_name": o.str("dataset_name"), "dataset_digest": o.str("dataset_digest")}
                for o in msg.objects("order_by")]
    datasets = [{"dataset_name": d.str("dataset_name", required=True),
                 "dataset_digest": d.str("dataset_digest")} for d in msg.objects("datasets")]
    return ctx.models.search(msg.str_list("experiment_ids"), msg.str("filter"), datasets or None,
                             msg.int("max_results"), order_by, msg.str("page_token"))


ROUTES = [
    json_route("POST", "/mlflow/logged-models", create),
    json_route("POST", "/mlflow/logged-models/search", search),
    json_route("GET", "/mlflow/logged-models/{model_id}", get),
    json_route("PATCH", "/mlflow/logged-models/{model_id}", finalize),
    json_route("DELETE", "/mlflow/logged-models/{model_id}", delete),
    json_route("PATCH", "/mlflow/logged-models/{model_id}/tags", set_tags),
    json_route("DELETE", "/mlflow/logged-models/{model_id}/tags/{tag_key}", delete_tag),
    json_route("POST", "/mlflow/logged-models/{model_id}/params", log_params),
]
