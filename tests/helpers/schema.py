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

_REVISION_FILE = '''"""A revision only a newer runyard has (test fixture).

Revision ID: {revision}
Revises: {head}
"""

import os
import pathlib
import time

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{head}"
branch_labels = None
depends_on = None
moves_rows = {moves_rows!r}


def upgrade() -> None:
{body}


def downgrade() -> None:
    raise NotImplementedError
'''

GOOD_UPGRADE = """\
    op.create_table("ry_newer_marker", sa.Column("id", sa.Integer(), primary_key=True))
"""

# Destroys data, then changes the schema (which commits on MySQL), then fails.
BROKEN_UPGRADE = """\
    op.execute("DELETE FROM metrics")
    op.add_column("runs", sa.Column("ry_half", sa.String(10), nullable=True))
    op.create_table("ry_half_table", sa.Column("id", sa.Integer(), primary_key=True))
    raise RuntimeError("revision 9002 is broken on purpose")
"""

# Like BROKEN_UPGRADE, but announces it is half-way (file RY_TEST_REACHED) and then sleeps to be killed.
STALLING_UPGRADE = """\
    op.execute("DELETE FROM metrics")
    op.add_column("runs", sa.Column("ry_half", sa.String(10), nullable=True))
    pathlib.Path(os.environ["RY_TEST_REACHED"]).write_text("half-way")
    time.sleep(float(os.environ.get("RY_TEST_SLEEP", "120")))
    op.create_table("ry_half_table", sa.Column("id", sa.Integer(), primary_key=True))
"""

# A correct revision that takes a while (RY_TEST_SLEEP seconds), so concurrent upgrades overlap.
SLOW_UPGRADE = """\
    time.sleep(float(os.environ.get("RY_TEST_SLEEP", "2")))
    op.create_table("ry_newer_marker", sa.Column("id", sa.Integer(), primary_key=True))
"""

# Loses rows without declaring it (moves_rows), which the upgrade's result check must catch.
LOSSY_UPGRADE = """\
    op.execute("DELETE FROM params")
    op.create_table("ry_newer_marker", sa.Column("id", sa.Integer(), primary_key=True))
"""


def newer_migrations(workdir: Path, body: str = GOOD_UPGRADE, moves_rows: tuple | bool = (),
                     name: str = "newer_migrations") -> Path:
    """A copy of the migrations package with one more revision on top, whose upgrade() runs `body`:
    what a newer runyard ships. Point `migrations.runner.SCRIPT_LOCATION` at it (or run the CLI through
    helpers.cli with `chain=`) to play that newer runyard."""
    location = workdir / name
    shutil.copytree(runner.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__"))
    text = _REVISION_FILE.format(revision=NEWER_REVISION, head=runner.head_revision(), body=body.rstrip(),
                                 moves_rows=moves_rows)
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
