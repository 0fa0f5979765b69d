"""A one-row table that says "an upgrade or restore of this database is under way".

Written (and committed) before the schema or data is touched, removed when the operation has finished.
A process killed half-way leaves it behind, so the next `runyard db upgrade` knows what was interrupted
and from which backup to restore, and a server refuses to start on a database in that state. The table
is operational, not part of the tracking schema: it exists only while an operation is under way.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import sqlalchemy as sa

TABLE_NAME = "runyard_operation"

_metadata = sa.MetaData()
_table = sa.Table(
    TABLE_NAME,
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False),  # "upgrade" or "restore"
    sa.Column("from_revision", sa.String(64), nullable=True),
    sa.Column("to_revision", sa.String(64), nullable=True),
    sa.Column("backup", sa.String(2048), nullable=True),  # where the backup taken before it lives
    sa.Column("started_at", sa.BigInteger, nullable=False),  # ms since the epoch
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class Operation:
    kind: str
    from_revision: str | None
    to_revision: str | None
    backup: str | None
    started_at: int = 0
    host: str = ""
    pid: int = 0

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at / 1000))
        what = (f"an upgrade from {self.from_revision or 'an empty database'} to {self.to_revision}"
                if self.kind == "upgrade" else f"a restore of backup {self.backup}")
        return f"{what}, started {started} by process {self.pid} on {self.host},"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "from_revision": self.from_revision, "to_revision": self.to_revision,
                "backup": self.backup, "started_at": self.started_at, "host": self.host, "pid": self.pid}


def read(conn: sa.Connection, table_names: set[str] | None = None) -> Operation | None:
    names = table_names if table_names is not None else set(sa.inspect(conn).get_table_names())
    if TABLE_NAME not in names:
        return None
    row = conn.execute(sa.select(_table).where(_table.c.id == 1)).mappings().first()
    if row is None:
        return None
    return Operation(row["kind"], row["from_revision"], row["to_revision"], row["backup"],
                     row["started_at"], row["host"], row["pid"])


def write(conn: sa.Connection, operation: Operation) -> Operation:
    """Records `operation` as under way (replacing any earlier record); the caller commits."""
    stamped = Operation(operation.kind, operation.from_revision, operation.to_revision, operation.backup,
                        int(time.time() * 1000), socket.gethostname(), os.getpid())
    _table.create(conn, checkfirst=True)
    conn.execute(_table.delete())
    values = stamped.as_dict()
    conn.execute(_table.insert().values(id=1, **values))
    return stamped


def clear(conn: sa.Connection) -> None:
    _table.drop(conn, checkfirst=True)
