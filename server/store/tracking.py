"""The tracking store: experiments, runs, params, metrics, tags and inputs/outputs on SQLAlchemy Core.

Every method returns plain dicts already shaped like MLflow's JSON entities, so the API layer only
encodes. Writes run in one transaction each (a batch is all-or-nothing) and are retried on the
transient conflicts concurrent writers cause (deadlocks, lock timeouts, racing first inserts).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from server.errors import RunyardError, already_exists, invalid, not_found
from server.store import search, validation
from server.store.names import random_run_name
from server.store.schema import (
    datasets,
    experiment_tags,
    experiments,
    input_tags,
    inputs,
    latest_metrics,
    logged_model_metrics,
    logged_models,
    metrics,
    params,
    run_tags,
    runs,
)
from server.store.sqlutil import among, chunks, id_batches, insert_ignore, raw_rows, upsert

log = logging.getLogger("runyard.store")

RUN_STATUSES = {"RUNNING": 1, "SCHEDULED": 2, "FINISHED": 3, "FAILED": 4, "KILLED": 5}
VIEW_TYPES = {"ACTIVE_ONLY": 1, "DELETED_ONLY": 2, "ALL": 3}
RUN_NAME_TAG = "mlflow.runName"
DATASET_CONTEXT_TAG = "mlflow.data.context"
MODEL_HISTORY_TAG = "mlflow.log-model.history"

_RUN_STATE = sa.select(runs.c.lifecycle_stage, runs.c.experiment_id).where(
    runs.c.run_uuid == sa.bindparam("run_id"))
_EXPERIMENT_BY_ID = sa.select(experiments).where(experiments.c.experiment_id == sa.bindparam("id"))


def now_ms() -> int:
    return int(time.time() * 1000)


def append_path(root: str, *parts: str) -> str:
    """MLflow's URI join: `mlflow-artifacts:/` + `1` -> `mlflow-artifacts:/1`, `/a/b` + `1` -> `/a/b/1`."""
    return root.rstrip("/") + "/" + "/".join(parts) if root.rstrip("/") else root + "/".join(parts)


def metric_json(key: str, value: float, timestamp: int, step: int, is_nan: bool) -> dict:
    return {"key": key, "value": "NaN" if is_nan else value, "timestamp": timestamp, "step": step}


def page(conn, query, limit: int, offset: int, field: str, to_json: Callable) -> dict:
    """One page of a search whose query fetched limit + 1 rows: the extra row means there is more."""
    rows = conn.execute(query).all()
    result = {}
    if rows:
        result[field] = to_json(conn, rows[:limit])
    if len(rows) > limit:
        result["next_page_token"] = search.encode_page_token(offset + limit)
    return result


def _retryable(exc: Exception) -> bool:
    if getattr(exc, "connection_invalidated", False):
        return True  # a pooled connection the database had closed; the pool already dropped it
    if isinstance(exc, sa_exc.IntegrityError):
        return True  # two writers raced to insert the same first row: the retry sees the winner's row
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in ("deadlock", "lock wait timeout", "database is locked",
                                   "could not serialize", "40001", "40p01"))


class TrackingStore:
    def __init__(self, engine: sa.Engine, artifact_root: str, truncate_long_values: bool = True):
        self.engine = engine
        self.artifact_root = artifact_root
        self.truncate_long_values = truncate_long_values
        self.dialect = engine.dialect.name
        self._latest_upsert = _latest_metric_upsert(self.dialect)

    # ------------------------------------------------------------------ transactions
    def write(self, fn: Callable, *args, single_statement: bool = False):
        """Run fn(conn, *args) in one write transaction, retrying transient conflicts.
        `single_statement`: fn issues one statement, atomic by itself, so it runs in autocommit mode
        and saves the BEGIN and COMMIT round trips."""
        for attempt in range(6):
            try:
                with self.engine.connect() as conn:
                    if single_statement:
                        conn.execution_options(isolation_level="AUTOCOMMIT")
                        return fn(conn, *args)
                    conn.execution_options(sqlite_begin="IMMEDIATE")
                    with conn.begin():
                        return fn(conn, *args)
            except sa_exc.DBAPIError as exc:
                if attempt == 5 or not _retryable(exc):
                    raise
                time.sleep(0.005 * 2**attempt)

    def read(self, fn: Callable, *args):
        try:
            with self.engine.connect() as conn:
                return fn(conn, *args)
        except sa_exc.DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self.engine.connect() as conn:  # once more, on a fresh connection
            return fn(conn, *args)

    # ------------------------------------------------------------------ experiments
    def ensure_default_experiment(self) -> None:
        def create(conn):
            if conn.execute(_EXPERIMENT_BY_ID, {"id": 0}).first() is not None:
                return
            if self.dialect in ("mysql", "mariadb"):
                conn.exec_driver_sql("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')")
            now = now_ms()
            conn.execute(experiments.insert().values(
                experiment_id=0, name="Default", artifact_location=append_path(self.artifact_root, "0"),
                lifecycle_stage="active", creation_time=now, last_update_time=now))

        self.write(create)

    def _experiment_row(self, conn, experiment_id: int):
        row = conn.execute(_EXPERIMENT_BY_ID, {"id": experiment_id}).first()
        if row is None:
            raise not_found(f"No Experiment with id={experiment_id} exists")
        return row

    def _experiment_json(self, conn, rows) -> list[dict]:
        ids = [r.experiment_id for r in rows]
        tags: dict[int, list] = {i: [] for i in ids}
        for part in chunks(ids):
            query = sa.select(experiment_tags).where(experiment_tags.c.experiment_id.in_(part))
            for t in conn.execute(query):
                tags[t.experiment_id].append({"key": t.key, "value": t.value})
        out = []
        for r in rows:
            exp = {"experiment_id": str(r.experiment_id), "name": r.name,
                   "artifact_location": r.artifact_location or "", "lifecycle_stage": r.lifecycle_stage,
                   "last_update_time": r.last_update_time, "creation_time": r.creation_time,
                   "workspace": r.workspace}
            if tags[r.experiment_id]:
                exp["tags"] = tags[r.experiment_id]
            out.append(exp)
        return out

    def create_experiment(self, name: str, artifact_location: str | None, tags: list[tuple[str, str]]) -> str:
        validation.experiment_name(name)
        artifact_location = self._validate_artifact_location(artifact_location)
        for k, v in tags:
            validation.key(k)
            if v is not None and len(v) > validation.MAX_EXPERIMENT_TAG_VALUE_LENGTH:
                raise invalid(f"Experiment tag '{k}' value exceeds the maximum length of "
                              f"{validation.MAX_EXPERIMENT_TAG_VALUE_LENGTH} characters.")

        def create(conn):
            if conn.execute(sa.select(experiments.c.experiment_id).where(
                    experiments.c.workspace == "default", experiments.c.name == name)).first():
                raise already_exists(f"Experiment(name={name}) already exists.")
            now = now_ms()
            new_id = conn.execute(experiments.insert().values(
                name=name, artifact_location=artifact_location, lifecycle_stage="active",
                creation_time=now, last_update_time=now)).inserted_primary_key[0]
            if artifact_location is None:
                conn.execute(experiments.update().where(experiments.c.experiment_id == new_id).values(
                    artifact_location=append_path(self.artifact_root, str(new_id))))
            if tags:
                upsert(conn, experiment_tags,
                       [{"experiment_id": new_id, "key": k, "value": v} for k, v in dict(tags).items()],
                       ["value"])
            return str(new_id)

        return self.write(create)

    @staticmethod
    def _validate_artifact_location(location: str | None) -> str | None:
        if not location:
            return None
        if location.startswith("runs:"):
            raise invalid("Experiment artifact location cannot be a runs:/ URI.")
        if len(location) > validation.MAX_ARTIFACT_LOCATION_LENGTH:
            raise invalid("Experiment artifact location exceeds the maximum length of "
                          f"{validation.MAX_ARTIFACT_LOCATION_LENGTH} characters.")
        if "#" in location or "\x00" in location:
            raise invalid("Experiment artifact location must not contain a '#' fragment or NUL.")
        if "://" not in location and not location.startswith(("mlflow-artifacts:", "file:")):
            return os.path.abspath(location)
        return location

    def get_experiment(self, experiment_id) -> dict:
        exp_id = validation.experiment_id(experiment_id)
        return self.read(lambda conn: self._experiment_json(conn, [self._experiment_row(conn, exp_id)])[0])

    def get_experiment_by_name(self, name: str) -> dict:
        def get(conn):
            row = conn.execute(sa.select(experiments).where(
                experiments.c.workspace == "default", experiments.c.name == name)).first()
            if row is None:
                raise not_found(f"Could not find experiment with name '{name}'")
            return self._experiment_json(conn, [row])[0]

        return self.read(get)

    def search_experiments(self, view_type: str, max_results: int | None, filter_string: str | None,
                           order_by: list[str], page_token: str | None) -> dict:
        limit = validation.max_results(max_results, 1000, validation.MAX_RESULTS_EXPERIMENTS)
        offset = search.decode_page_token(page_token)
        query = search.experiments_query(filter_string, view_type, order_by, offset, limit + 1)

        return self.read(lambda conn: page(conn, query, limit, offset, "experiments", self._experiment_json))

    def _set_experiment_stage(self, experiment_id, stage: str) -> None:
        exp_id = validation.experiment_id(experiment_id)

        def change(conn):
            self._experiment_row(conn, exp_id)
            now = now_ms()
            deleted_time = now if stage == "deleted" else None
            conn.execute(experiments.update().where(experiments.c.experiment_id == exp_id).values(
                lifecycle_stage=stage, last_update_time=now, deleted_time=deleted_time))
            # A deleted experiment's runs are deleted with it, and come back with it.
            conn.execute(runs.update().where(runs.c.experiment_id == exp_id).values(
                lifecycle_stage=stage, deleted_time=deleted_time))

        self.write(change)

    def delete_experiment(self, experiment_id) -> None:
        self._set_experiment_stage(experiment_id, "deleted")

    def restore_experiment(self, experiment_id) -> None:
        self._set_experiment_stage(experiment_id, "active")

    def rename_experiment(self, experiment_id, new_name: str) -> None:
        exp_id = validation.experiment_id(experiment_id)
        validation.experiment_name(new_name)

        def rename(conn):
            row = self._experiment_row(conn, exp_id)
            if row.lifecycle_stage != "active":
                raise RunyardError("Cannot rename a non-active experiment.", "INVALID_STATE")
            clash = conn.execute(sa.select(experiments.c.experiment_id).where(
                experiments.c.workspace == row.workspace, experiments.c.name == new_name,
                experiments.c.experiment_id != exp_id)).first()
            if clash:
                raise already_exists(f"Experiment(name={new_name}) already exists.")
            conn.execute(experiments.update().where(experiments.c.experiment_id == exp_id).values(
                name=new_name, last_update_time=now_ms()))

        self.write(rename)

    def set_experiment_tag(self, experiment_id, key: str, value: str) -> None:
        exp_id = validation.experiment_id(experiment_id)
        validation.key(key)
        if value is not None and len(value) > validation.MAX_EXPERIMENT_TAG_VALUE_LENGTH:
            raise invalid(f"Experiment tag '{key}' value exceeds the maximum length of "
                          f"{validation.MAX_EXPERIMENT_TAG_VALUE_LENGTH} characters.")

        def set_tag(conn):
            self._require_active_experiment(conn, exp_id)
            upsert(conn, experiment_tags, [{"experiment_id": exp_id, "key": key, "value": value}], ["value"])

        self.write(set_tag)

    def delete_experiment_tag(self, experiment_id, key: str) -> None:
        exp_id = validation.experiment_id(experiment_id)

        def delete(conn):
            self._require_active_experiment(conn, exp_id)
            deleted = conn.execute(experiment_tags.delete().where(
                experiment_tags.c.experiment_id == exp_id, experiment_tags.c.key == key)).rowcount
            if not deleted:
                raise not_found(f"No tag with name: {key} in experiment with id {exp_id}")

        self.write(delete)

    def _require_active_experiment(self, conn, exp_id: int):
        row = self._experiment_row(conn, exp_id)
        if row.lifecycle_stage != "active":
            raise invalid(f"The experiment {exp_id} must be in the 'active' state. "
                          f"Current state is {row.lifecycle_stage}.")
        return row

    # ------------------------------------------------------------------ runs
    def create_run(self, experiment_id, user_id: str | None, start_time: int | None, run_name: str | None,
                   tags: list[tuple[str, str]]) -> dict:
        exp_id = validation.experiment_id(experiment_id if experiment_id not in (None, "") else 0)
        tag_map = self._validated_tags(tags)
        tag_name = tag_map.get(RUN_NAME_TAG)
        if run_name and tag_name and run_name != tag_name:
            raise invalid("Both 'run_name' argument and 'mlflow.runName' tag are specified, but with "
                          f"different values (run_name='{run_name}', mlflow.runName='{tag_name}').")
        run_name = run_name or tag_name or random_run_name()
        tag_map[RUN_NAME_TAG] = run_name
        run_id = uuid.uuid4().hex
        start_time = start_time if start_time is not None else now_ms()

        def create(conn):
            exp = self._require_active_experiment(conn, exp_id)
            row = {"run_uuid": run_id, "experiment_id": exp_id, "name": run_name, "user_id": user_id,
                   "status": "RUNNING", "start_time": start_time, "end_time": None,
                   "lifecycle_stage": "active", "deleted_time": None,
                   "artifact_uri": append_path(exp.artifact_location or self.artifact_root, run_id,
                                               "artifacts")}
            conn.execute(runs.insert(), row)
            conn.execute(run_tags.insert(), [{"run_uuid": run_id, "key": k, "value": v}
                                             for k, v in tag_map.items()])
            return row

        row = self.write(create)
        return {"info": _run_info(row),
                "data": {"tags": [{"key": k, "value": v} for k, v in tag_map.items()]},
                "inputs": {}, "outputs": {}}

    def _validated_tags(self, tags: list[tuple[str, str]]) -> dict[str, str]:
        out = {}
        for k, v in tags:
            validation.key(k)
            v = "" if v is None else v
            if len(v) > validation.MAX_TAG_VALUE_LENGTH:
                if not self.truncate_long_values:
                    raise invalid(f"Tag '{k}' value exceeds the maximum length of "
                                  f"{validation.MAX_TAG_VALUE_LENGTH} characters.")
                v = validation.truncate(v, validation.MAX_TAG_VALUE_LENGTH)
            out[k] = v
        return out

    def _run_row(self, conn, run_id: str):
        row = conn.execute(sa.select(runs).where(runs.c.run_uuid == run_id)).first()
        if row is None:
            raise not_found(f"Run with id={run_id} not found")
        return row

    def _require_active_run(self, conn, run_id: str):
        row = conn.execute(_RUN_STATE, {"run_id": run_id}).first()
        if row is None:
            raise not_found(f"Run with id={run_id} not found")
        if row.lifecycle_stage != "active":
            raise invalid(f"The run {run_id} must be in the 'active' state. "
                          f"Current state is {row.lifecycle_stage}.")
        return row

    def get_run(self, run_id: str) -> dict:
        if not run_id:
            raise invalid("Missing value for required parameter 'run_id'.")
        return self.read(lambda conn: self._runs_json(conn, [self._run_row(conn, run_id)])[0])

    def update_run(self, run_id: str, status: str | None, end_time: int | None, run_name: str | None) -> dict:
        def update(conn):
            self._require_active_run(conn, run_id)
            values = {}
            if status is not None:
                values["status"] = status
            if end_time is not None:
                values["end_time"] = end_time
            if run_name:
                values["name"] = run_name
                upsert(conn, run_tags, [{"run_uuid": run_id, "key": RUN_NAME_TAG, "value": run_name}],
                       ["value"])
            if values:
                conn.execute(runs.update().where(runs.c.run_uuid == run_id).values(values))
            return _run_info(self._run_row(conn, run_id)._mapping)

        return self.write(update)

    def _set_run_stage(self, run_id: str, stage: str) -> None:
        def change(conn):
            self._run_row(conn, run_id)
            conn.execute(runs.update().where(runs.c.run_uuid == run_id).values(
                lifecycle_stage=stage, deleted_time=now_ms() if stage == "deleted" else None))

        self.write(change)

    def delete_run(self, run_id: str) -> None:
        self._set_run_stage(run_id, "deleted")

    def restore_run(self, run_id: str) -> None:
        self._set_run_stage(run_id, "active")

    def delete_tag(self, run_id: str, key: str) -> None:
        def delete(conn):
            self._require_active_run(conn, run_id)
            deleted = conn.execute(run_tags.delete().where(run_tags.c.run_uuid == run_id,
                                                           run_tags.c.key == key)).rowcount
            if not deleted:
                raise not_found(f"No tag with name: {key} in run with id {run_id}")

        self.write(delete)

    # ------------------------------------------------------------------ logging (the hot path)
    def log_batch(self, run_id: str, metric_points: list[dict], param_pairs: list[tuple[str, str]],
                  tag_pairs: list[tuple[str, str]]) -> None:
        """All-or-nothing. metric_points: dicts with key, value (float), timestamp, step and optionally
        model_id, dataset_name, dataset_digest. Identical points are stored once (retries are safe)."""
        validation.run_id(run_id)
        _check_batch_limits(len(metric_points), len(param_pairs), len(tag_pairs))
        metric_rows, latest, model_points = self._metric_rows(run_id, metric_points)
        param_map = self._validated_params(param_pairs)
        tag_map = self._validated_tags(tag_pairs)
        if self.dialect == "postgresql" and metric_rows and not (param_map or tag_map or model_points):
            self.write(self._log_metrics_pg, run_id, metric_rows, list(latest.values()),
                       single_statement=True)
            return

        def log(conn):
            state = self._require_active_run(conn, run_id)
            if param_map:
                self._insert_params(conn, run_id, param_map)
            if metric_rows:
                self._insert_metrics(conn, metric_rows)
                self._update_latest(conn, list(latest.values()))
                if model_points:
                    self._link_model_metrics(conn, run_id, state.experiment_id, model_points)
            if tag_map:
                upsert(conn, run_tags, [{"run_uuid": run_id, "key": k, "value": v}
                                        for k, v in tag_map.items()], ["value"])
                if RUN_NAME_TAG in tag_map:
                    conn.execute(runs.update().where(runs.c.run_uuid == run_id).values(
                        name=tag_map[RUN_NAME_TAG][:250]))

        self.write(log)

    @staticmethod
    def _metric_rows(run_id: str, points: list[dict]):
        rows: dict[tuple, dict] = {}
        latest: dict[str, dict] = {}
        model_points = []
        for p in points:
            key = validation.key(p["key"])
            value, is_nan = validation.metric_point(key, p["value"], p["timestamp"], p["step"])
            row = {"run_uuid": run_id, "key": key, "timestamp": p["timestamp"], "step": p["step"],
                   "value": value, "is_nan": is_nan}
            rows[(key, p["timestamp"], p["step"], value, is_nan)] = row
            best = latest.get(key)
            if best is None or (row["step"], row["timestamp"], value) > (best["step"], best["timestamp"],
                                                                       best["value"]):
                latest[key] = row
            if p.get("model_id"):
                model_points.append(row | {"model_id": p["model_id"], "dataset_name": p.get("dataset_name"),
                                           "dataset_digest": p.get("dataset_digest")})
        return list(rows.values()), latest, model_points

    def _validated_params(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        out: dict[str, str] = {}
        duplicates = set()
        for k, v in pairs:
            validation.key(k)
            v = "" if v is None else str(v)
            if len(v) > validation.MAX_PARAM_VALUE_LENGTH:
                if not self.truncate_long_values:
                    raise invalid(f"Param '{k}' value exceeds the maximum length of "
                                  f"{validation.MAX_PARAM_VALUE_LENGTH} characters.")
                v = validation.truncate(v, validation.MAX_PARAM_VALUE_LENGTH)
            if k in out and out[k] != v:
                duplicates.add(k)
            out[k] = v
        if duplicates:
            raise invalid(f"Duplicate parameter keys have been submitted: {sorted(duplicates)}. Please "
                          "ensure the request contains only one param value per param key.")
        return out

    def _insert_params(self, conn, run_id: str, param_map: dict[str, str]) -> None:
        keys = list(param_map)
        existing = {}
        for part in chunks(keys):
            existing.update(conn.execute(sa.select(params.c.key, params.c.value).where(
                params.c.run_uuid == run_id, params.c.key.in_(part))).all())
        for k, old in existing.items():
            if old != param_map[k]:
                raise invalid(f"Changing param values is not allowed. Param with key='{k}' was already "
                              f"logged with value='{old}' for run ID='{run_id}'. Attempted logging new "
                              f"value '{param_map[k]}'.")
        new = [{"run_uuid": run_id, "key": k, "value": v} for k, v in param_map.items() if k not in existing]
        if new:
            conn.execute(params.insert(), new)

    @staticmethod
    def _log_metrics_pg(conn, run_id: str, rows: list[dict], latest: list[dict]) -> None:
        """log-metric and metric-only batches on PostgreSQL: the run check, the history insert and the
        latest-value upsert in one statement, one round trip (the hottest call of all)."""
        arrays = {**_pg_metric_arrays(rows), **_pg_metric_arrays(latest, prefix="latest_")}
        state = conn.execute(_PG_LOG_METRICS, {"run_uuid": run_id, **arrays}).first()
        if state is None:
            raise not_found(f"Run with id={run_id} not found")
        if state.lifecycle_stage != "active":  # nothing was written: the inserts are guarded by it
            raise invalid(f"The run {run_id} must be in the 'active' state. "
                          f"Current state is {state.lifecycle_stage}.")

    def _insert_metrics(self, conn, rows: list[dict]) -> None:
        if self.dialect == "sqlite":
            # The driver's own executemany over plain tuples: building SQLAlchemy's per-row
            # parameters cost as much as the insert itself.
            cursor = conn.connection.dbapi_connection.cursor()
            cursor.executemany(_SQLITE_METRICS_INSERT, [
                (r["run_uuid"], r["key"], r["timestamp"], r["step"], r["value"], r["is_nan"]) for r in rows])
            cursor.close()
            return
        if self.dialect != "postgresql":
            insert_ignore(conn, metrics, rows)
            return
        # PostgreSQL: one statement with one array parameter per column instead of a
        # statement per point (the driver's executemany), several times faster for big batches.
        conn.execute(_PG_METRICS_FROM_ARRAYS, {"run_uuid": rows[0]["run_uuid"], **_pg_metric_arrays(rows)})

    def _update_latest(self, conn, rows: list[dict]) -> None:
        if self._latest_upsert is not None:
            conn.execute(self._latest_upsert, rows)
            return
        # Portable path (MySQL/MariaDB, MSSQL): lock the current rows, compare in Python.
        by_key = {r["key"]: r for r in rows}
        run_id = rows[0]["run_uuid"]
        current = {}
        for part in chunks(list(by_key)):
            query = sa.select(latest_metrics).where(latest_metrics.c.run_uuid == run_id,
                                                    latest_metrics.c.key.in_(part)).with_for_update()
            current.update({r.key: r for r in conn.execute(query)})
        inserts, updates = [], []
        for key, row in by_key.items():
            old = current.get(key)
            if old is None:
                inserts.append(row)
            elif (row["step"], row["timestamp"], row["value"]) > (old.step, old.timestamp, old.value):
                updates.append({**row, "b_run": run_id, "b_key": key})
        if inserts:
            conn.execute(latest_metrics.insert(), inserts)
        if updates:
            conn.execute(latest_metrics.update().where(
                latest_metrics.c.run_uuid == sa.bindparam("b_run"),
                latest_metrics.c.key == sa.bindparam("b_key")).values(
                value=sa.bindparam("value"), timestamp=sa.bindparam("timestamp"),
                step=sa.bindparam("step"), is_nan=sa.bindparam("is_nan")), updates)

    def _link_model_metrics(self, conn, run_id: str, experiment_id: int, points: list[dict]) -> None:
        model_ids = sorted({p["model_id"] for p in points})
        known = set(conn.execute(sa.select(logged_models.c.model_id).where(
            logged_models.c.model_id.in_(model_ids))).scalars())
        missing = set(model_ids) - known
        if missing:
            raise not_found(f"Logged model with ID '{sorted(missing)[0]}' not found.")
        rows = {}
        for p in points:
            rows[(p["model_id"], p["key"], p["timestamp"], p["step"])] = {
                "model_id": p["model_id"], "metric_name": p["key"], "metric_timestamp_ms": p["timestamp"],
                "metric_step": p["step"], "run_id": run_id, "experiment_id": experiment_id,
                "metric_value": None if p["is_nan"] else p["value"], "dataset_uuid": None,
                "dataset_name": p["dataset_name"], "dataset_digest": p["dataset_digest"]}
        upsert(conn, logged_model_metrics, list(rows.values()),
               ["metric_value", "dataset_name", "dataset_digest"])

    def append_logged_model_history(self, run_id: str, model: dict) -> None:
        """Legacy `runs/log-model` (2.x clients): the model's metadata joins the run's history tag."""
        def append(conn):
            self._require_active_run(conn, run_id)
            current = conn.execute(sa.select(run_tags.c.value).where(
                run_tags.c.run_uuid == run_id, run_tags.c.key == MODEL_HISTORY_TAG)).scalar()
            history = json.loads(current) if current else []
            history.append(model)
            upsert(conn, run_tags, [{"run_uuid": run_id, "key": MODEL_HISTORY_TAG,
                                     "value": json.dumps(history)}], ["value"])

        self.write(append)

    # ------------------------------------------------------------------ inputs / outputs
    def log_inputs(self, run_id: str, dataset_inputs: list[dict], model_ids: list[str]) -> None:
        for d in dataset_inputs:
            _validate_dataset(d)

        def log(conn):
            state = self._require_active_run(conn, run_id)
            for d in dataset_inputs:
                ds = d["dataset"]
                dataset_uuid = conn.execute(sa.select(datasets.c.dataset_uuid).where(
                    datasets.c.experiment_id == state.experiment_id, datasets.c.name == ds["name"],
                    datasets.c.digest == ds["digest"])).scalar()
                if dataset_uuid is None:
                    dataset_uuid = uuid.uuid4().hex
                    conn.execute(datasets.insert().values(
                        dataset_uuid=dataset_uuid, experiment_id=state.experiment_id, name=ds["name"],
                        digest=ds["digest"], source_type=ds["source_type"], source=ds["source"],
                        schema=ds.get("schema"), profile=ds.get("profile")))
                link = self._link(conn, "DATASET", dataset_uuid, "RUN", run_id)
                if link is not None and d["tags"]:
                    conn.execute(input_tags.insert(), [{"input_uuid": link, "name": k, "value": v}
                                                       for k, v in d["tags"].items()])
            if model_ids:
                self._require_models(conn, model_ids)
                for model_id in model_ids:
                    self._link(conn, "RUN_INPUT", run_id, "MODEL_INPUT", model_id)

        self.write(log)

    def log_outputs(self, run_id: str, outputs: list[tuple[str, int]]) -> None:
        def log(conn):
            self._require_active_run(conn, run_id)
            self._require_models(conn, [m for m, _ in outputs])
            for model_id, step in outputs:
                self._link(conn, "RUN_OUTPUT", run_id, "MODEL_OUTPUT", model_id, step)

        self.write(log)

    @staticmethod
    def _require_models(conn, model_ids: list[str]) -> None:
        known = set(conn.execute(sa.select(logged_models.c.model_id).where(
            logged_models.c.model_id.in_(model_ids))).scalars())
        for model_id in model_ids:
            if model_id not in known:
                raise not_found(f"Logged model with ID '{model_id}' not found.")

    @staticmethod
    def _link(conn, source_type, source_id, destination_type, destination_id, step=0) -> str | None:
        """Insert the link unless it exists; returns the new link's id, or None if it existed."""
        exists = conn.execute(sa.select(inputs.c.input_uuid).where(
            inputs.c.source_type == source_type, inputs.c.source_id == source_id,
            inputs.c.destination_type == destination_type, inputs.c.destination_id == destination_id)).first()
        if exists is not None:
            return None
        input_uuid = uuid.uuid4().hex
        conn.execute(inputs.insert().values(input_uuid=input_uuid, source_type=source_type,
                                            source_id=source_id, destination_type=destination_type,
                                            destination_id=destination_id, step=step))
        return input_uuid

    # ------------------------------------------------------------------ reads
    def get_metric_history(self, run_id: str, key: str, max_results: int | None, page_token: str | None):
        if max_results is not None and max_results <= 0:
            raise invalid(f"Invalid value {max_results} for parameter 'max_results' supplied. "
                          "It must be a positive integer.")
        offset = search.decode_page_token(page_token)

        def history(conn):
            self._run_row(conn, run_id)
            query = (sa.select(metrics.c.timestamp, metrics.c.step, metrics.c.value, metrics.c.is_nan)
                     .where(metrics.c.run_uuid == run_id, metrics.c.key == key)
                     .order_by(metrics.c.timestamp, metrics.c.step, metrics.c.value))
            if max_results is not None:
                query = query.limit(max_results + 1).offset(offset)
            rows = raw_rows(conn, query)
            result = {}
            if max_results is not None and len(rows) > max_results:
                rows = rows[:max_results]
                result["next_page_token"] = search.encode_page_token(offset + max_results)
            if rows:
                result["metrics"] = [
                    {"key": key, "value": "NaN" if nan else value, "timestamp": ts, "step": step}
                    for ts, step, value, nan in rows]
            return result

        return self.read(history)

    def get_metric_history_sampled(self, run_ids: list[str], key: str, max_results: int,
                                   start_step: int | None, end_step: int | None) -> list[dict]:
        """Up to max_results points per run, evenly spread over its history (first and last kept),
        optionally within [start_step, end_step]: what charts need, not every point."""

        def sample(conn):
            out = []
            for run_id in run_ids:
                self._run_row(conn, run_id)
                query = (sa.select(metrics.c.timestamp, metrics.c.step, metrics.c.value, metrics.c.is_nan)
                         .where(metrics.c.run_uuid == run_id, metrics.c.key == key)
                         .order_by(metrics.c.step, metrics.c.timestamp, metrics.c.value, metrics.c.is_nan))
                if start_step is not None:
                    query = query.where(metrics.c.step.between(start_step, end_step))
                rows = conn.execute(query).all()
                for i in _evenly_spaced(len(rows), max_results):
                    ts, step, value, nan = rows[i]
                    out.append(metric_json(key, value, ts, step, nan) | {"run_id": run_id})
            return out

        return self.read(sample)

    def search_runs(self, experiment_ids: list, filter_string: str | None, view_type: str,
                    max_results: int | None, order_by: list[str], page_token: str | None) -> dict:
        limit = validation.max_results(max_results, 1000, validation.MAX_RESULTS_RUNS)
        exp_ids = [validation.experiment_id(e) for e in experiment_ids]
        if not exp_ids:
            return {}
        offset = search.decode_page_token(page_token)
        query = search.runs_query(exp_ids, filter_string, view_type, order_by, offset, limit + 1)

        return self.read(lambda conn: page(conn, query, limit, offset, "runs", self._runs_json))

    def _runs_json(self, conn, rows) -> list[dict]:
        """Full Run entities for `rows`, hydrated with one query per child table, not per run."""
        ids = [r.run_uuid for r in rows]
        out = {r.run_uuid: {"info": _run_info(r._mapping), "data": {}, "inputs": {}, "outputs": {}}
               for r in rows}

        def add(run_id, section, field, item):
            out[run_id][section].setdefault(field, []).append(item)

        lm = latest_metrics.c
        for part in id_batches(conn, ids):
            latest = sa.select(lm.run_uuid, lm.key, lm.value, lm.timestamp, lm.step, lm.is_nan)
            for run_id, key, value, ts, step, nan in raw_rows(
                    conn, latest.where(among(conn, lm.run_uuid, part))):
                add(run_id, "data", "metrics", metric_json(key, value, ts, step, nan))
            for table, field in ((params, "params"), (run_tags, "tags")):
                pairs = sa.select(table.c.run_uuid, table.c.key, table.c.value)
                for run_id, key, value in raw_rows(conn, pairs.where(among(conn, table.c.run_uuid, part))):
                    add(run_id, "data", field, {"key": key, "value": value})
            links = conn.execute(sa.select(inputs).where(
                sa.or_(sa.and_(inputs.c.destination_type == "RUN", inputs.c.destination_id.in_(part)),
                       sa.and_(inputs.c.source_type.in_(("RUN_INPUT", "RUN_OUTPUT")),
                               inputs.c.source_id.in_(part))))).all()
            if links:
                self._add_links(conn, links, add)
        return [out[i] for i in ids]

    @staticmethod
    def _add_links(conn, links, add) -> None:
        dataset_links = [link for link in links if link.source_type == "DATASET"]
        dataset_rows, tags_by_link = {}, {}
        if dataset_links:
            uuids = list({link.source_id for link in dataset_links})
            dataset_rows = {d.dataset_uuid: d for d in conn.execute(
                sa.select(datasets).where(datasets.c.dataset_uuid.in_(uuids)))}
            for t in conn.execute(sa.select(input_tags).where(
                    input_tags.c.input_uuid.in_([link.input_uuid for link in dataset_links]))):
                tags_by_link.setdefault(t.input_uuid, []).append({"key": t.name, "value": t.value})
        for link in links:
            if link.source_type == "DATASET":
                d = dataset_rows.get(link.source_id)
                if d is None:
                    continue
                dataset = {"name": d.name, "digest": d.digest, "source_type": d.source_type,
                           "source": d.source}
                if d.schema is not None:
                    dataset["schema"] = d.schema
                if d.profile is not None:
                    dataset["profile"] = d.profile
                item = {"dataset": dataset}
                if link.input_uuid in tags_by_link:
                    item["tags"] = tags_by_link[link.input_uuid]
                add(link.destination_id, "inputs", "dataset_inputs", item)
            elif link.source_type == "RUN_INPUT":
                add(link.source_id, "inputs", "model_inputs", {"model_id": link.destination_id})
            else:
                add(link.source_id, "outputs", "model_outputs", {"model_id": link.destination_id,
                                                                 "step": link.step})


def _run_info(r) -> dict:
    """RunInfo from a runs row (a mapping: a fetched row's `_mapping`, or the dict just inserted)."""
    info = {"run_id": r["run_uuid"], "run_uuid": r["run_uuid"], "run_name": r["name"] or "",
            "experiment_id": str(r["experiment_id"]), "user_id": r["user_id"] or "", "status": r["status"],
            "artifact_uri": r["artifact_uri"] or "", "lifecycle_stage": r["lifecycle_stage"]}
    if r["start_time"] is not None:
        info["start_time"] = r["start_time"]
    if r["end_time"] is not None:
        info["end_time"] = r["end_time"]
    return info


def _evenly_spaced(total: int, count: int) -> list[int]:
    if total <= count:
        return list(range(total))
    if count == 1:
        return [total - 1]
    stride = (total - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def _check_batch_limits(n_metrics: int, n_params: int, n_tags: int) -> None:
    for count, limit, what in ((n_metrics, validation.MAX_BATCH_METRICS, "metrics"),
                               (n_params, validation.MAX_BATCH_PARAMS, "params"),
                               (n_tags, validation.MAX_BATCH_TAGS, "tags")):
        if count > limit:
            raise invalid(f"A batch logging request can contain at most {limit} {what}. Got {count} "
                          f"{what}. Please split up {what} across multiple requests and try again.")
    total = n_metrics + n_params + n_tags
    if total > validation.MAX_BATCH_ENTITIES:
        raise invalid(f"A batch logging request can contain at most {validation.MAX_BATCH_ENTITIES} total "
                      f"metrics, params and tags. Got {total}. Please split up across multiple requests "
                      "and try again.")


def _validate_dataset(d: dict) -> None:
    ds = d["dataset"]
    for field, limit in (("name", validation.MAX_DATASET_NAME), ("digest", validation.MAX_DATASET_DIGEST),
                         ("source_type", 36), ("source", validation.MAX_DATASET_SOURCE),
                         ("schema", validation.MAX_DATASET_SCHEMA),
                         ("profile", validation.MAX_DATASET_PROFILE)):
        value = ds.get(field)
        if value is None:
            if field in ("name", "digest", "source_type", "source"):
                raise invalid(f"Missing value for required parameter 'dataset.{field}'.")
            continue
        if len(value) > limit:
            raise invalid(f"Dataset {field} exceeds the maximum length of {limit} characters.")
    for k, v in d["tags"].items():
        if len(k) > validation.MAX_INPUT_TAG_KEY or len(v) > validation.MAX_INPUT_TAG_VALUE:
            raise invalid(f"Input tag '{k[:40]}' exceeds the maximum key length "
                          f"{validation.MAX_INPUT_TAG_KEY} or value length {validation.MAX_INPUT_TAG_VALUE}.")


_SQLITE_METRICS_INSERT = ("INSERT OR IGNORE INTO metrics (run_uuid, key, timestamp, step, value, is_nan) "
                          "VALUES (?, ?, ?, ?, ?, ?)")
def _pg_metric_arrays(rows: list[dict], prefix: str = "") -> dict:
    """One array parameter per column (PostgreSQL unnests them), instead of one statement per row."""
    return {f"{prefix}{column}": [r[column] for r in rows]
            for column in ("key", "timestamp", "step", "value", "is_nan")}


def _pg_unnest(prefix: str = "") -> str:
    return (f"unnest(CAST(:{prefix}key AS varchar[]), CAST(:{prefix}timestamp AS bigint[]), "
            f"CAST(:{prefix}step AS bigint[]), CAST(:{prefix}value AS double precision[]), "
            f"CAST(:{prefix}is_nan AS boolean[])) AS p(key, timestamp, step, value, is_nan)")


_PG_METRICS_FROM_ARRAYS = sa.text(
    "INSERT INTO metrics (run_uuid, key, timestamp, step, value, is_nan) "
    f"SELECT :run_uuid, p.* FROM {_pg_unnest()} ON CONFLICT DO NOTHING")

# The statement text is fixed: every value travels as a bound parameter.
_PG_LOG_METRICS = sa.text(
    "WITH run AS (SELECT lifecycle_stage FROM runs WHERE run_uuid = :run_uuid), "
    "history AS (INSERT INTO metrics (run_uuid, key, timestamp, step, value, is_nan) "
    f"  SELECT :run_uuid, p.* FROM {_pg_unnest()} "
    "  WHERE EXISTS (SELECT 1 FROM run WHERE lifecycle_stage = 'active') ON CONFLICT DO NOTHING), "
    "latest AS (INSERT INTO latest_metrics AS old (run_uuid, key, timestamp, step, value, is_nan) "
    f"  SELECT :run_uuid, p.* FROM {_pg_unnest('latest_')} "
    "  WHERE EXISTS (SELECT 1 FROM run WHERE lifecycle_stage = 'active') "
    "  ON CONFLICT (run_uuid, key) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp, "
    "  step = excluded.step, is_nan = excluded.is_nan "
    "  WHERE (excluded.step, excluded.timestamp, excluded.value) > (old.step, old.timestamp, old.value)) "
    "SELECT lifecycle_stage FROM run")


def _latest_metric_upsert(dialect: str):
    """One INSERT .. ON CONFLICT DO UPDATE .. WHERE newer statement, for dialects that have it."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return None
    stmt = insert(latest_metrics)
    new, old = stmt.excluded, latest_metrics.c
    newer = sa.tuple_(new.step, new.timestamp, new.value) > sa.tuple_(old.step, old.timestamp, old.value)
    return stmt.on_conflict_do_update(
        index_elements=["run_uuid", "key"],
        set_={"value": new.value, "timestamp": new.timestamp, "step": new.step, "is_nan": new.is_nan},
        where=newer)
