"""Every table of the tracking store: the single source of truth the Alembic chain follows.

Designed for the hot paths rather than copied from MLflow:
- metric history is keyed (run, key, timestamp, step, value, is_nan): the primary key both de-duplicates
  retried points and serves history reads in the order the API returns them;
- `latest_metrics` keeps one row per (run, key) so search filters/ordering and `runs/get` never scan history;
- SQLite tables with composite keys are WITHOUT ROWID (clustered on the key), MySQL/MariaDB tables use a
  binary collation so `=` and `LIKE` are case-sensitive on every dialect, as MLflow's are.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

KEY_LENGTH = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
# Large text: MySQL's TEXT stops at 64 KiB, dataset schemas and profiles are larger.
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")

_CLUSTERED = {"sqlite_with_rowid": False}
_MYSQL = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mariadb_charset": "utf8mb4",
          "mariadb_collate": "utf8mb4_bin"}


def _run_fk() -> sa.ForeignKey:
    return sa.ForeignKey("runs.run_uuid", ondelete="CASCADE")


def _experiment_fk() -> sa.ForeignKey:
    return sa.ForeignKey("experiments.experiment_id", ondelete="CASCADE")


experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("experiment_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("workspace", sa.String(63), nullable=False, server_default="default"),
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("artifact_location", sa.String(2048), nullable=True),
    sa.Column("lifecycle_stage", sa.String(32), nullable=False),
    sa.Column("creation_time", sa.BigInteger, nullable=True),
    sa.Column("last_update_time", sa.BigInteger, nullable=True),
    sa.Column("deleted_time", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("workspace", "name"),
    sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')", name="lifecycle_stage"),
    **_MYSQL,
)

experiment_tags = sa.Table(
    "experiment_tags",
    metadata,
    sa.Column("experiment_id", sa.Integer, _experiment_fk(), primary_key=True),
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
    sa.Column("value", LongText, nullable=True),
    **_CLUSTERED,
    **_MYSQL,
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_uuid", sa.String(32), primary_key=True),
    sa.Column("experiment_id", sa.Integer, _experiment_fk(), nullable=False),
    sa.Column("name", sa.String(250), nullable=True),
    sa.Column("user_id", sa.String(256), nullable=True),
    sa.Column("status", sa.String(9), nullable=False),
    sa.Column("start_time", sa.BigInteger, nullable=True),
    sa.Column("end_time", sa.BigInteger, nullable=True),
    sa.Column("lifecycle_stage", sa.String(20), nullable=False),
    sa.Column("artifact_uri", sa.String(2200), nullable=True),
    sa.Column("deleted_time", sa.BigInteger, nullable=True),
    sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')", name="lifecycle_stage"),
    sa.CheckConstraint(
        "status IN ('RUNNING', 'SCHEDULED', 'FINISHED', 'FAILED', 'KILLED')", name="status"
    ),
    sa.Index(None, "experiment_id", "start_time"),
    **_MYSQL,
)

run_tags = sa.Table(
    "run_tags",
    metadata,
    sa.Column("run_uuid", sa.String(32), _run_fk(), primary_key=True),
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
    sa.Column("value", sa.String(8000), nullable=True),
    **_CLUSTERED,
    **_MYSQL,
)

params = sa.Table(
    "params",
    metadata,
    sa.Column("run_uuid", sa.String(32), _run_fk(), primary_key=True),
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
    sa.Column("value", sa.String(8000), nullable=False),
    **_CLUSTERED,
    **_MYSQL,
)

# Metric history. NaN is stored as value 0 with is_nan set (NaN never equals itself, so it cannot be
# part of a de-duplicating key); +/-Infinity are stored as +/-max double, as MLflow does.
metrics = sa.Table(
    "metrics",
    metadata,
    sa.Column("run_uuid", sa.String(32), _run_fk(), primary_key=True),
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
    sa.Column("timestamp", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("step", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("value", sa.Double, primary_key=True),
    sa.Column("is_nan", sa.Boolean, primary_key=True),
    **_CLUSTERED,
    **_MYSQL,
)

# The point with the greatest (step, timestamp, value) per run and key.
latest_metrics = sa.Table(
    "latest_metrics",
    metadata,
    sa.Column("run_uuid", sa.String(32), _run_fk(), primary_key=True),
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("timestamp", sa.BigInteger, nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False),
    sa.Column("is_nan", sa.Boolean, nullable=False),
    **_CLUSTERED,
    **_MYSQL,
)

datasets = sa.Table(
    "datasets",
    metadata,
    sa.Column("dataset_uuid", sa.String(36), primary_key=True),
    sa.Column("experiment_id", sa.Integer, _experiment_fk(), nullable=False),
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("digest", sa.String(36), nullable=False),
    sa.Column("source_type", sa.String(36), nullable=False),
    sa.Column("source", LongText, nullable=False),
    sa.Column("schema", LongText, nullable=True),
    sa.Column("profile", LongText, nullable=True),
    sa.UniqueConstraint("experiment_id", "name", "digest"),
    **_MYSQL,
)

# Links between entities: DATASET -> RUN (log-inputs), RUN_INPUT -> MODEL_INPUT, RUN_OUTPUT -> MODEL_OUTPUT.
inputs = sa.Table(
    "inputs",
    metadata,
    sa.Column("input_uuid", sa.String(36), primary_key=True),
    sa.Column("source_type", sa.String(36), nullable=False),
    sa.Column("source_id", sa.String(36), nullable=False),
    sa.Column("destination_type", sa.String(36), nullable=False),
    sa.Column("destination_id", sa.String(36), nullable=False),
    sa.Column("step", sa.BigInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("source_type", "source_id", "destination_type", "destination_id"),
    sa.Index(None, "destination_type", "destination_id"),
    **_MYSQL,
)

input_tags = sa.Table(
    "input_tags",
    metadata,
    sa.Column("input_uuid", sa.String(36), sa.ForeignKey("inputs.input_uuid", ondelete="CASCADE"),
              primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("value", sa.String(500), nullable=False),
    **_CLUSTERED,
    **_MYSQL,
)

logged_models = sa.Table(
    "logged_models",
    metadata,
    sa.Column("model_id", sa.String(36), primary_key=True),
    sa.Column("experiment_id", sa.Integer, _experiment_fk(), nullable=False),
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("artifact_location", sa.String(2200), nullable=False),
    sa.Column("creation_timestamp_ms", sa.BigInteger, nullable=False),
    sa.Column("last_updated_timestamp_ms", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("lifecycle_stage", sa.String(32), nullable=False),
    sa.Column("model_type", sa.String(500), nullable=True),
    sa.Column("source_run_id", sa.String(32), nullable=True),
    sa.Column("status_message", sa.String(1000), nullable=True),
    sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')", name="lifecycle_stage"),
    sa.Index(None, "experiment_id", "creation_timestamp_ms"),
    **_MYSQL,
)


def _model_fk() -> sa.ForeignKey:
    return sa.ForeignKey("logged_models.model_id", ondelete="CASCADE")


logged_model_params = sa.Table(
    "logged_model_params",
    metadata,
    sa.Column("model_id", sa.String(36), _model_fk(), primary_key=True),
    sa.Column("param_key", sa.String(255), primary_key=True),
    sa.Column("experiment_id", sa.Integer, nullable=False),
    sa.Column("param_value", LongText, nullable=False),
    **_CLUSTERED,
    **_MYSQL,
)

logged_model_tags = sa.Table(
    "logged_model_tags",
    metadata,
    sa.Column("model_id", sa.String(36), _model_fk(), primary_key=True),
    sa.Column("tag_key", sa.String(255), primary_key=True),
    sa.Column("experiment_id", sa.Integer, nullable=False),
    sa.Column("tag_value", LongText, nullable=False),
    **_CLUSTERED,
    **_MYSQL,
)

logged_model_metrics = sa.Table(
    "logged_model_metrics",
    metadata,
    sa.Column("model_id", sa.String(36), _model_fk(), primary_key=True),
    sa.Column("metric_name", sa.String(500), primary_key=True),
    sa.Column("metric_timestamp_ms", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("metric_step", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("run_id", sa.String(32), _run_fk(), primary_key=True),
    sa.Column("metric_value", sa.Double, nullable=True),
    sa.Column("experiment_id", sa.Integer, nullable=False),
    sa.Column("dataset_uuid", sa.String(36), nullable=True),
    sa.Column("dataset_name", sa.String(500), nullable=True),
    sa.Column("dataset_digest", sa.String(36), nullable=True),
    **_CLUSTERED,
    **_MYSQL,
)

# Bearer tokens that NGINX's auth_request checks through the server (toolkit `runyard tokens`). Only a keyed
# hash of each token is kept; the token itself is shown once, when it is created.
access_tokens = sa.Table(
    "access_tokens",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("user_name", sa.String(255), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created_time", sa.BigInteger, nullable=False),
    sa.Column("expires_time", sa.BigInteger, nullable=True),
    sa.Column("last_used_time", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("token_hash"),
    **_MYSQL,
)
