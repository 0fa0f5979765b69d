"""What a database holds, table by table: row count and a checksum of the rows.

A backup's manifest records these for the database as it was dumped; verify and restore compute them
again on the restored copy and compare. Any changed, missing or extra row moves the checksum.
- PostgreSQL, MySQL: computed inside the database, as the sum modulo 2**64 of a 64-bit hash (MD5) of
  each row's text: independent of row order, so no sort of ten million rows.
- SQLite (no hash function in SQL): one BLAKE2b over the rows in primary-key order, read in Python.
Values are comparable between databases of the same kind only, which is all a backup needs: it is
always restored into the kind it came from.
"""

from __future__ import annotations

import hashlib
import sqlite3

import sqlalchemy as sa

from migrations import marker

METHODS = {
    "sqlite": "sqlite-blake2b64-key-order",
    "postgresql": "postgresql-md5-64-sum",
    "mysql": "mysql-md5-64-sum",
    "mariadb": "mysql-md5-64-sum",
}


def method(dialect: str) -> str:
    return METHODS[dialect]


def table_names(conn: sa.Connection) -> list[str]:
    """Every table in the connection's schema except the interrupted-operation marker."""
    return sorted(name for name in sa.inspect(conn).get_table_names() if name != marker.TABLE_NAME)


def table_stats(conn: sa.Connection) -> dict[str, dict]:
    """{table: {"rows": n, "checksum": "…"}} for every table of the connection's schema."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        raw = conn.connection.driver_connection
        return {table: _sqlite_stats(raw, table) for table in table_names(conn)}
    quote = conn.dialect.identifier_preparer.quote
    stats = {}
    for table in table_names(conn):
        if dialect == "postgresql":
            query = (f"SELECT count(*), coalesce(sum(('x' || substr(md5(t::text), 1, 16))::bit(64)::bigint),"
                     f" 0) FROM {quote(table)} AS t")
        elif dialect in ("mysql", "mariadb"):
            columns = [column["name"] for column in sa.inspect(conn).get_columns(table)]
            row_text = "CONCAT_WS(',', " + ", ".join(f"QUOTE({quote(c)})" for c in columns) + ")"
            query = (f"SELECT COUNT(*), COALESCE(SUM(CAST(CONV(LEFT(MD5({row_text}), 16), 16, 10) "
                     f"AS UNSIGNED)), 0) FROM {quote(table)}")
        else:
            raise ValueError(f"no checksum for dialect {dialect}")
        rows, total = conn.execute(sa.text(query)).one()
        stats[table] = {"rows": int(rows), "checksum": str(int(total) % 2**64)}
    return stats


def sqlite_file_stats(path: str) -> dict[str, dict]:
    """table_stats of a SQLite database file, opened read-only."""
    raw = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [row[0] for row in raw.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {name: _sqlite_stats(raw, name) for name in names if name != marker.TABLE_NAME}
    finally:
        raw.close()


def _sqlite_stats(raw: sqlite3.Connection, table: str) -> dict:
    # Rows in primary-key order (a plain scan of a WITHOUT ROWID table), hashed a batch at a time: in
    # Python, per-row work is what costs, and a key order makes the batches the same on every copy.
    quoted = _sqlite_quote(table)
    columns = sorted((row[5], row[1]) for row in raw.execute(f"PRAGMA table_info({quoted})"))
    key = [name for position, name in columns if position > 0] or [name for _, name in columns]
    cursor = raw.execute(f"SELECT * FROM {quoted} ORDER BY {', '.join(map(_sqlite_quote, key))}")
    digest, rows = hashlib.blake2b(digest_size=8), 0
    while batch := cursor.fetchmany(10_000):
        rows += len(batch)
        digest.update(repr(batch).encode())
    return {"rows": rows, "checksum": str(int.from_bytes(digest.digest(), "big"))}


def _sqlite_quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def differences(expected: dict[str, dict], actual: dict[str, dict]) -> list[str]:
    """Human lines naming every table whose rows differ; empty when the two are identical."""
    lines = []
    for table in sorted(set(expected) | set(actual)):
        want, got = expected.get(table), actual.get(table)
        if want is None:
            lines.append(f"{table}: not in the backup")
        elif got is None:
            lines.append(f"{table}: missing")
        elif want["rows"] != got["rows"]:
            lines.append(f"{table}: {got['rows']} rows, expected {want['rows']}")
        elif want["checksum"] != got["checksum"]:
            lines.append(f"{table}: same row count, different contents")
    return lines
