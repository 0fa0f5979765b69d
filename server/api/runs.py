"""Run routes: lifecycle, logging (params, metrics, tags, batches), inputs/outputs and search."""

from __future__ import annotations

import orjson

from server.api.message import INT64_MAX, Message
from server.api.routing import json_route
from server.errors import invalid
from server.store.tracking import RUN_STATUSES, VIEW_TYPES


def run_id_of(msg: Message) -> str:
    """Clients send `run_id`, older ones `run_uuid`; either is accepted."""
    run_id = msg.str("run_id") or msg.str("run_uuid")
    if not run_id:
        raise Message.missing("run_id")
    return run_id


def _param_pairs(msg: Message) -> list[tuple[str, str]]:
    # Params arrive as strings; tolerate numbers from hand-written clients by stringifying them.
    return [(m.str("key", required=True), _as_text(m.raw("value"))) for m in msg.objects("params")]


def _as_text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def metric_point(m: Message) -> dict:
    return {"key": m.str("key", required=True), "value": m.float("value", required=True),
            "timestamp": m.int("timestamp", required=True), "step": m.int("step", default=0),
            "model_id": m.str("model_id"), "dataset_name": m.str("dataset_name"),
            "dataset_digest": m.str("dataset_digest")}


def metric_points(msg: Message) -> list[dict]:
    """The batch's metrics. Points that are exactly what the stock client sends (snake_case, native
    JSON types) skip the general field-by-field decoding: batches of 1000 are the hot path."""
    items = msg.raw("metrics")
    if not isinstance(items, list) or not all(type(item) is dict for item in items):
        return [metric_point(m) for m in msg.objects("metrics")]  # raises the field's error
    points = []
    for item in items:
        point = _plain_metric(item) if item.keys() <= _PLAIN_METRIC_FIELDS else None
        points.append(point or metric_point(Message(item)))
    return points


def _plain_metric(item: dict) -> dict | None:
    key, value, ts, step = item.get("key"), item.get("value"), item.get("timestamp"), item.get("step", 0)
    extras = (item.get("model_id"), item.get("dataset_name"), item.get("dataset_digest"))
    number = type(value) is float or (type(value) is int and -INT64_MAX <= value <= INT64_MAX)
    if (type(key) is str and number
            and type(ts) is int and type(step) is int
            and -INT64_MAX - 1 <= ts <= INT64_MAX and -INT64_MAX - 1 <= step <= INT64_MAX
            and all(e is None or type(e) is str for e in extras)):
        return {"key": key, "value": float(value), "timestamp": ts, "step": step,
                "model_id": extras[0] or None, "dataset_name": extras[1], "dataset_digest": extras[2]}
    return None


USER_TAG = "mlflow.user"
_PLAIN_METRIC_FIELDS = {"key", "value", "timestamp", "step", "run_id", "run_uuid", "model_id",
                        "dataset_name", "dataset_digest"}


def create(msg: Message, ctx) -> dict:
    user_id, tags = msg.str("user_id"), msg.pairs("tags")
    if msg.user is not None:  # authenticated by the proxy: the run is theirs, whatever the client claims
        user_id = msg.user
        tags = [(k, v) for k, v in tags if k != USER_TAG] + [(USER_TAG, msg.user)]
    run = ctx.store.create_run(msg.str("experiment_id"), user_id, msg.int("start_time"),
                               msg.str("run_name"), tags)
    return {"run": run}


def get(msg: Message, ctx) -> dict:
    return {"run": ctx.store.get_run(run_id_of(msg))}


def update(msg: Message, ctx) -> dict:
    info = ctx.store.update_run(run_id_of(msg), msg.enum("status", RUN_STATUSES), msg.int("end_time"),
                                msg.str("run_name"))
    return {"run_info": info}


def delete(msg: Message, ctx) -> dict:
    ctx.store.delete_run(run_id_of(msg))
    return {}


def restore(msg: Message, ctx) -> dict:
    ctx.store.restore_run(run_id_of(msg))
    return {}


def log_metric(msg: Message, ctx) -> dict:
    ctx.store.log_batch(run_id_of(msg), [metric_point(msg)], [], [])
    return {}


def log_param(msg: Message, ctx) -> dict:
    ctx.store.log_batch(run_id_of(msg), [], [(msg.str("key", required=True), _as_text(msg.raw("value")))],
                        [])
    return {}


def set_tag(msg: Message, ctx) -> dict:
    ctx.store.log_batch(run_id_of(msg), [], [], [(msg.str("key", required=True),
                                                  msg.str("value", default=""))])
    return {}


def delete_tag(msg: Message, ctx) -> dict:
    ctx.store.delete_tag(run_id_of(msg), msg.str("key", required=True))
    return {}


def log_batch(msg: Message, ctx) -> dict:
    run_id = run_id_of(msg)
    points, params, tags = metric_points(msg), _param_pairs(msg), msg.pairs("tags")
    ctx.store.log_batch(run_id, points, params, tags)
    if ctx.metrics is not None:  # --expose-prometheus: the sizes of the batches written
        ctx.metrics.observe_batch(len(points), len(params), len(tags))
    return {}


def log_inputs(msg: Message, ctx) -> dict:
    dataset_inputs = []
    for item in msg.objects("datasets"):
        dataset = item.object("dataset")
        if dataset is None:
            raise Message.missing("datasets.dataset")
        fields = {f: dataset.str(f) for f in ("name", "digest", "source_type", "source", "schema", "profile")}
        dataset_inputs.append({"dataset": fields, "tags": dict(item.pairs("tags"))})
    model_ids = [m.str("model_id", required=True) for m in msg.objects("models")]
    ctx.store.log_inputs(run_id_of(msg), dataset_inputs, model_ids)
    return {}


def log_outputs(msg: Message, ctx) -> dict:
    outputs = [(m.str("model_id", required=True), m.int("step", default=0)) for m in msg.objects("models")]
    ctx.store.log_outputs(run_id_of(msg), outputs)
    return {}


def log_model(msg: Message, ctx) -> dict:
    text = msg.str("model_json", required=True)
    try:
        model = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise invalid("Malformed model info: 'model_json' is not valid JSON.") from None
    if not isinstance(model, dict) or not {"artifact_path", "flavors"} <= model.keys():
        raise invalid("Model json is missing mandatory fields: artifact_path and flavors are required.")
    ctx.store.append_logged_model_history(run_id_of(msg), model)
    return {}


def search(msg: Message, ctx) -> dict:
    return ctx.store.search_runs(
        experiment_ids=msg.str_list("experiment_ids"),
        filter_string=msg.str("filter"),
        view_type=msg.enum("run_view_type", VIEW_TYPES, default="ACTIVE_ONLY"),
        max_results=msg.int("max_results"),
        order_by=msg.str_list("order_by"),
        page_token=msg.str("page_token"),
    )


ROUTES = [
    json_route("POST", "/mlflow/runs/create", create),
    json_route("GET", "/mlflow/runs/get", get),
    json_route("POST", "/mlflow/runs/update", update),
    json_route("POST", "/mlflow/runs/delete", delete),
    json_route("POST", "/mlflow/runs/restore", restore),
    json_route("POST", "/mlflow/runs/log-metric", log_metric),
    json_route("POST", "/mlflow/runs/log-parameter", log_param),
    json_route("POST", "/mlflow/runs/set-tag", set_tag),
    json_route("POST", "/mlflow/runs/delete-tag", delete_tag),
    json_route("POST", "/mlflow/runs/log-batch", log_batch),
    json_route("POST", "/mlflow/runs/log-inputs", log_inputs),
    json_route("POST", "/mlflow/runs/outputs", log_outputs),
    json_route("POST", "/mlflow/runs/log-model", log_model),
    json_route(("POST", "GET"), "/mlflow/runs/search", search),
]
