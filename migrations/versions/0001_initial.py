"""Initial schema.

Frozen: this file must never change once released. Later schema changes are new revisions; the test
`test_upgraded_schema_matches_schema_py` proves the chain still ends at `server/store/schema.py`.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Same table options as schema.py, spelled out here so this revision never follows later edits there.
MYSQL = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin", "mariadb_charset": "utf8mb4",
         "mariadb_collate": "utf8mb4_bin"}
CLUSTERED = {"sqlite_with_rowid": False}


def long_text() -> sa.types.TypeEngine:
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql").with_variant(mysql.LONGTEXT(), "mariadb")


def fk(column: str, target: str, table: str) -> sa.ForeignKeyConstraint:
    """A cascading foreign key named by the naming convention of schema.py."""
    target_table = target.split(".")[0]
    return sa.ForeignKeyConstraint([column], [target], name=op.f(f"fk_{table}_{column}_{target_table}"),
                                   ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("experiment_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workspace", sa.String(length=63), server_default="default", nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("artifact_location", sa.String(length=2048), nullable=True),
        sa.Column("lifecycle_stage", sa.String(length=32), nullable=False),
        sa.Column("creation_time", sa.BigInteger(), nullable=True),
        sa.Column("last_update_time", sa.BigInteger(), nullable=True),
        sa.Column("deleted_time", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')",
                           name=op.f("ck_experiments_lifecycle_stage")),
        sa.PrimaryKeyConstraint("experiment_id", name=op.f("pk_experiments")),
        sa.UniqueConstraint("workspace", "name", name=op.f("uq_experiments_workspace_name")),
        **MYSQL,
    )
    op.create_table(
        "experiment_tags",
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", long_text(), nullable=True),
        fk("experiment_id", "experiments.experiment_id", "experiment_tags"),
        sa.PrimaryKeyConstraint("experiment_id", "key", name=op.f("pk_experiment_tags")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "runs",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=250), nullable=True),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("status", sa.String(length=9), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=True),
        sa.Column("end_time", sa.BigInteger(), nullable=True),
        sa.Column("lifecycle_stage", sa.String(length=20), nullable=False),
        sa.Column("artifact_uri", sa.String(length=2200), nullable=True),
        sa.Column("deleted_time", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')", name=op.f("ck_runs_lifecycle_stage")),
        sa.CheckConstraint("status IN ('RUNNING', 'SCHEDULED', 'FINISHED', 'FAILED', 'KILLED')",
                           name=op.f("ck_runs_status")),
        fk("experiment_id", "experiments.experiment_id", "runs"),
        sa.PrimaryKeyConstraint("run_uuid", name=op.f("pk_runs")),
        **MYSQL,
    )
    op.create_index(op.f("ix_runs_experiment_id_start_time"), "runs", ["experiment_id", "start_time"])
    op.create_table(
        "run_tags",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", sa.String(length=8000), nullable=True),
        fk("run_uuid", "runs.run_uuid", "run_tags"),
        sa.PrimaryKeyConstraint("run_uuid", "key", name=op.f("pk_run_tags")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "params",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", sa.String(length=8000), nullable=False),
        fk("run_uuid", "runs.run_uuid", "params"),
        sa.PrimaryKeyConstraint("run_uuid", "key", name=op.f("pk_params")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "metrics",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("step", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("is_nan", sa.Boolean(), nullable=False),
        fk("run_uuid", "runs.run_uuid", "metrics"),
        sa.PrimaryKeyConstraint("run_uuid", "key", "timestamp", "step", "value", "is_nan",
                                name=op.f("pk_metrics")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "latest_metrics",
        sa.Column("run_uuid", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=250), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("is_nan", sa.Boolean(), nullable=False),
        fk("run_uuid", "runs.run_uuid", "latest_metrics"),
        sa.PrimaryKeyConstraint("run_uuid", "key", name=op.f("pk_latest_metrics")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "datasets",
        sa.Column("dataset_uuid", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("digest", sa.String(length=36), nullable=False),
        sa.Column("source_type", sa.String(length=36), nullable=False),
        sa.Column("source", long_text(), nullable=False),
        sa.Column("schema", long_text(), nullable=True),
        sa.Column("profile", long_text(), nullable=True),
        fk("experiment_id", "experiments.experiment_id", "datasets"),
        sa.PrimaryKeyConstraint("dataset_uuid", name=op.f("pk_datasets")),
        sa.UniqueConstraint("experiment_id", "name", "digest",
                            name=op.f("uq_datasets_experiment_id_name_digest")),
        **MYSQL,
    )
    op.create_table(
        "inputs",
        sa.Column("input_uuid", sa.String(length=36), nullable=False),
        sa.Column("source_type", sa.String(length=36), nullable=False),
        sa.Column("source_id", sa.String(length=36), nullable=False),
        sa.Column("destination_type", sa.String(length=36), nullable=False),
        sa.Column("destination_id", sa.String(length=36), nullable=False),
        sa.Column("step", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("input_uuid", name=op.f("pk_inputs")),
        sa.UniqueConstraint("source_type", "source_id", "destination_type", "destination_id",
                            name=op.f("uq_inputs_source_type_source_id_destination_type_destination_id")),
        **MYSQL,
    )
    op.create_index(op.f("ix_inputs_destination_type_destination_id"), "inputs",
                    ["destination_type", "destination_id"])
    op.create_table(
        "input_tags",
        sa.Column("input_uuid", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        fk("input_uuid", "inputs.input_uuid", "input_tags"),
        sa.PrimaryKeyConstraint("input_uuid", "name", name=op.f("pk_input_tags")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "logged_models",
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("artifact_location", sa.String(length=2200), nullable=False),
        sa.Column("creation_timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_updated_timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("lifecycle_stage", sa.String(length=32), nullable=False),
        sa.Column("model_type", sa.String(length=500), nullable=True),
        sa.Column("source_run_id", sa.String(length=32), nullable=True),
        sa.Column("status_message", sa.String(length=1000), nullable=True),
        sa.CheckConstraint("lifecycle_stage IN ('active', 'deleted')",
                           name=op.f("ck_logged_models_lifecycle_stage")),
        fk("experiment_id", "experiments.experiment_id", "logged_models"),
        sa.PrimaryKeyConstraint("model_id", name=op.f("pk_logged_models")),
        **MYSQL,
    )
    op.create_index(op.f("ix_logged_models_experiment_id_creation_timestamp_ms"), "logged_models",
                    ["experiment_id", "creation_timestamp_ms"])
    op.create_table(
        "logged_model_params",
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("param_key", sa.String(length=255), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("param_value", long_text(), nullable=False),
        fk("model_id", "logged_models.model_id", "logged_model_params"),
        sa.PrimaryKeyConstraint("model_id", "param_key", name=op.f("pk_logged_model_params")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "logged_model_tags",
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("tag_key", sa.String(length=255), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("tag_value", long_text(), nullable=False),
        fk("model_id", "logged_models.model_id", "logged_model_tags"),
        sa.PrimaryKeyConstraint("model_id", "tag_key", name=op.f("pk_logged_model_tags")),
        **CLUSTERED,
        **MYSQL,
    )
    op.create_table(
        "logged_model_metrics",
        sa.Column("model_id", sa.String(length=36), nullable=False),
        sa.Column("metric_name", sa.String(length=500), nullable=False),
        sa.Column("metric_timestamp_ms", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("metric_step", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("metric_value", sa.Double(), nullable=True),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("dataset_uuid", sa.String(length=36), nullable=True),
        sa.Column("dataset_name", sa.String(length=500), nullable=True),
        sa.Column("dataset_digest", sa.String(length=36), nullable=True),
        fk("model_id", "logged_models.model_id", "logged_model_metrics"),
        fk("run_id", "runs.run_uuid", "logged_model_metrics"),
        sa.PrimaryKeyConstraint("model_id", "metric_name", "metric_timestamp_ms", "metric_step", "run_id",
                                name=op.f("pk_logged_model_metrics")),
        **CLUSTERED,
        **MYSQL,
    )


def downgrade() -> None:
    for table in ("logged_model_metrics", "logged_model_tags", "logged_model_params", "logged_models",
                  "input_tags", "inputs", "datasets", "latest_metrics", "metrics", "params", "run_tags",
                  "runs", "experiment_tags", "experiments"):
        op.drop_table(table)
