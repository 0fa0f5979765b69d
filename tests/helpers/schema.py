"""Schema helpers for migration tests: hand-stamped revisions, a simulated newer runyard, schema diffs."""

from __future__ import annotations

import shutil
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from migrations import runner
from server.store.schema import metadata
from server.store.uri import create_engine

NEWER_REVISION = "9002"
UNKNOWN_REVISION = "ffffffffffff"

_NEWER_REVISION_FILE = f'''"""A revision only a newer runyard has (test fixture).

Revision ID: {NEWER_REVISION}
Revises: {{head}}
"""

import sqlalchemy as sa
from alembic import op

revision = "{NEWER_REVISION}"
down_revision = "{{head}}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("ry_newer_marker", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("ry_newer_marker")
'''


def newer_migrations(workdir: Path) -> Path:
    """A copy of the migrations package with one more revision on top: what a newer runyard ships.
    Point `migrations.runner.SCRIPT_LOCATION` at it to play that newer runyard."""
    location = workdir / "newer_migrations"
    shutil.copytree(runner.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__"))
    text = _NEWER_REVISION_FILE.replace("{head}", runner.head_revision())
    (location / "versions" / f"{NEWER_REVISION}_newer.py").write_text(text)
    return location


def engine_for(uri: str) -> sa.Engine:
    return create_engine(uri, pool_size=1)


def stamp(uri: str, revision: str) -> None:
    """Overwrites the stored revision by hand, as an older or newer runyard would have left it."""
    engine = engine_for(uri)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :rev"), {"rev": revision})
    finally:
        engine.dispose()


def schema_diff(uri: str) -> list:
    """Alembic's autogenerate diff between the database and server/store/schema.py (empty = equal)."""
    engine = engine_for(uri)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


def table_names(uri: str) -> set[str]:
    engine = engine_for(uri)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
