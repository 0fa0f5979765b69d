"""Logged models (MLflow 3): a model's record, its params, tags and the run metrics linked to it."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from server.errors import invalid, not_found
from server.store import search, validation
from server.store.names import random_run_name
from server.store.schema import (
    logged_model_metrics,
    logged_model_params,
    logged_model_tags,
    logged_models,
)
from server.store.sqlutil import chunks, upsert
from server.store.tracking import TrackingStore, append_path, now_ms, page

MODEL_STATUSES = {"LOGGED_MODEL_STATUS_UNSPECIFIED": 0, "LOGGED_MODEL_PENDING": 1, "LOGGED_MODEL_READY": 2,
                  "LOGGED_MODEL_UPLOAD_FAILED": 3}
_STATUS_NAMES = {v: k for k, v in MODEL_STATUSES.items()}
_FORBIDDEN_NAME_CHARS = set('/:.%"\'')


def _validate_name(name: str) -> None:
    if not name or _FORBIDDEN_NAME_CHARS & set(name):
        raise invalid(f"Invalid model name '{name}': names must be non-empty and must not contain any of "
                      "/ : . % \" '")


class LoggedModelStore:
    def __init__(self, tracking: TrackingStore):
        self.tracking = tracking

    def create(self, experiment_id, name: str | None, model_type: str | None, source_run_id: str | None,
               params: list[tuple[str, str]], tags: list[tuple[str, str]]) -> dict:
        exp_id = validation.experiment_id(experiment_id)
        name = name or random_run_name()
        _validate_name(name)
        for k, _ in params + tags:
            validation.key(k)
        model_id = f"m-{uuid.uuid4().hex}"

        def create(conn):
            exp = self.tracking._require_active_experiment(conn, exp_id)
            if source_run_id:
                self.tracking._run_row(conn, source_run_id)
            now = now_ms()
            conn.execute(logged_models.insert().values(
                model_id=model_id, experiment_id=exp_id, name=name, model_type=model_type,
                source_run_id=source_run_id or None, status=MODEL_STATUSES["LOGGED_MODEL_PENDING"],
                lifecycle_stage="active", creation_timestamp_ms=now, last_updated_timestamp_ms=now,
                artifact_location=append_path(exp.artifact_location or self.tracking.artifact_root,
                                              "models", model_id, "artifacts")))
            self._put_params(conn, model_id, exp_id, params)
            self._put_tags(conn, model_id, exp_id, tags)
            return self._models_json(conn, [self._row(conn, model_id)])[0]

        return self.tracking.write(create)

    @staticmethod
    def _put_params(conn, model_id, exp_id, pairs):
        upsert(conn, logged_model_params, [{"model_id": model_id, "experiment_id": exp_id, "param_key": k,
                                            "param_value": v} for k, v in dict(pairs).items()],
               ["param_value"])

    @staticmethod
    def _put_tags(conn, model_id, exp_id, pairs):
        upsert(conn, logged_model_tags, [{"model_id": model_id, "experiment_id": exp_id, "tag_key": k,
                                          "tag_value": v} for k, v in dict(pairs).items()], ["tag_value"])

    @staticmethod
    def _row(conn, model_id: str, allow_deleted: bool = False):
        row = conn.execute(sa.select(logged_models).where(logged_models.c.model_id == model_id)).first()
        if row is None or (row.lifecycle_stage != "active" and not allow_deleted):
            raise not_found(f"Logged model with ID '{model_id}' not found.")
        return row

    def get(self, model_id: str, allow_deleted: bool = False) -> dict:
        return self.tracking.read(
            lambda conn: self._models_json(conn, [self._row(conn, model_id, allow_deleted)])[0])

    def finalize(self, model_id: str, status: str) -> dict:
        def finalize(conn):
            self._row(conn, model_id)
            conn.execute(logged_models.update().where(logged_models.c.model_id == model_id).values(
                status=MODEL_STATUSES[status], last_updated_timestamp_ms=now_ms()))
            return self._models_json(conn, [self._row(conn, model_id)])[0]

        return self.tracking.write(finalize)

    def delete(self, model_id: str) -> None:
        def delete(conn):
            self._row(conn, model_id)
            conn.execute(logged_models.update().where(logged_models.c.model_id == model_id).values(
                lifecycle_stage="deleted", last_updated_timestamp_ms=now_ms()))

        self.tracking.write(delete)

    def set_tags(self, model_id: str, tags: list[tuple[str, str]]) -> None:
        for k, _ in tags:
            validation.key(k)
        self.tracking.write(lambda conn: self._put_tags(
            conn, model_id, self._row(conn, model_id).experiment_id, tags))

    def delete_tag(self, model_id: str, key: str) -> None:
        def delete(conn):
            self._row(conn, model_id)
            deleted = conn.execute(logged_model_tags.delete().where(
                logged_model_tags.c.model_id == model_id, logged_model_tags.c.tag_key == key)).rowcount
            if not deleted:
                raise not_found(f"No tag with key '{key}' found for logged model with ID '{model_id}'.")

        self.tracking.write(delete)

    def log_params(self, model_id: str, params: list[tuple[str, str]]) -> None:
        for k, _ in params:
            validation.key(k)
        self.tracking.write(lambda conn: self._put_params(
            conn, model_id, self._row(conn, model_id).experiment_id, params))

    def search(self, experiment_ids: list, filter_string: str | None, datasets: list[dict] | None,
               max_results: int | None, order_by: list[dict], page_token: str | None) -> dict:
        limit = validation.max_results(max_results, 100, validation.MAX_RESULTS_RUNS)
        exp_ids = [validation.experiment_id(e) for e in experiment_ids]
        if not exp_ids:
            return {}
        offset = search.decode_page_token(page_token)
        query = search.logged_models_query(exp_ids, filter_string, datasets, order_by, offset, limit + 1)

        return self.tracking.read(lambda conn: page(conn, query, limit, offset, "models", self._models_json))

    @staticmethod
    def _models_json(conn, rows) -> list[dict]:
        ids = [r.model_id for r in rows]
        out = {}
        for r in rows:
            info = {"model_id": r.model_id, "experiment_id": str(r.experiment_id), "name": r.name,
                    "creation_timestamp_ms": r.creation_timestamp_ms,
                    "last_updated_timestamp_ms": r.last_updated_timestamp_ms,
                    "artifact_uri": r.artifact_location, "status": _STATUS_NAMES.get(r.status, "")}
            for field in ("model_type", "source_run_id", "status_message"):
                if getattr(r, field):
                    info[field] = getattr(r, field)
            out[r.model_id] = {"info": info, "data": {}}
        for part in chunks(ids):
            for t in conn.execute(sa.select(logged_model_tags).where(logged_model_tags.c.model_id.in_(part))):
                out[t.model_id]["info"].setdefault("tags", []).append(
                    {"key": t.tag_key, "value": t.tag_value})
            for p in conn.execute(sa.select(logged_model_params).where(
                    logged_model_params.c.model_id.in_(part))):
                out[p.model_id]["data"].setdefault("params", []).append(
                    {"key": p.param_key, "value": p.param_value})
            for m in conn.execute(sa.select(logged_model_metrics).where(
                    logged_model_metrics.c.model_id.in_(part))):
                metric = {"key": m.metric_name,
                          "value": "NaN" if m.metric_value is None else m.metric_value,
                          "timestamp": m.metric_timestamp_ms, "step": m.metric_step, "model_id": m.model_id,
                          "run_id": m.run_id}
                if m.dataset_name:
                    metric["dataset_name"] = m.dataset_name
                if m.dataset_digest:
                    metric["dataset_digest"] = m.dataset_digest
                out[m.model_id]["data"].setdefault("metrics", []).append(metric)
        return [out[i] for i in ids]
