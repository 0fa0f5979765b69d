"""Dialect-aware bulk writes: insert-ignoring-duplicates and upsert, each one statement where the dialect
has the construct, a portable fallback where it does not (MSSQL)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

IN_CHUNK = 500  # bound parameters per IN list: stays under every dialect's limit


def chunks(items: Sequence, size: int = IN_CHUNK) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def id_batches(conn: sa.Connection, ids: Sequence) -> Iterable[Sequence]:
    """The id lists to hydrate with: all at once on PostgreSQL (one array parameter), in chunks
    elsewhere (one bound parameter per id)."""
    return [ids] if conn.dialect.name == "postgresql" else chunks(ids)


def among(conn: sa.Connection, column: sa.ColumnElement, ids: Sequence) -> sa.ColumnElement:
    """`column IN ids`; on PostgreSQL `column = ANY(:array)`, so the statement text stays small and
    constant instead of growing a placeholder per id."""
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(None, list(ids), type_=postgresql.ARRAY(column.type)))
    return column.in_(ids)


def raw_rows(conn: sa.Connection, stmt: sa.Select) -> list[tuple]:
    """Plain tuples straight from the driver's cursor, for reads of many thousand rows where building
    SQLAlchemy Row objects would cost more than the query. The statement still goes through
    SQLAlchemy (its compiled-statement cache, bound parameters); only the row wrapping is skipped, so
    use it for columns that need no result conversion (strings, numbers, booleans)."""
    result = conn.execute(stmt)
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def _insert_for(conn: sa.Connection, table: sa.Table):
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    if name in ("mysql", "mariadb"):
        return mysql.insert(table)
    return None


def insert_ignore(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    """Insert rows, silently skipping those whose primary key already exists."""
    if not rows:
        return
    stmt = _insert_for(conn, table)
    if stmt is None:
        _portable_insert_missing(conn, table, rows)
    elif conn.dialect.name in ("mysql", "mariadb"):
        first_key = table.primary_key.columns.values()[0]
        conn.execute(stmt.on_duplicate_key_update({first_key.name: stmt.inserted[first_key.name]}), rows)
    else:
        conn.execute(stmt.on_conflict_do_nothing(), rows)


def upsert(conn: sa.Connection, table: sa.Table, rows: list[dict], update_columns: Sequence[str]) -> None:
    """Insert rows or overwrite `update_columns` of the rows with the same primary key."""
    if not rows:
        return
    stmt = _insert_for(conn, table)
    if stmt is None:
        _portable_upsert(conn, table, rows)
    elif conn.dialect.name in ("mysql", "mariadb"):
        conn.execute(stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in update_columns}), rows)
    else:
        pk = [c.name for c in table.primary_key.columns]
        conn.execute(stmt.on_conflict_do_update(index_elements=pk,
                                                set_={c: stmt.excluded[c] for c in update_columns}), rows)


def _pk_where(table: sa.Table, row: dict):
    return sa.and_(*(c == row[c.name] for c in table.primary_key.columns))


def _portable_insert_missing(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    for row in rows:
        exists = sa.select(sa.literal(1)).select_from(table).where(_pk_where(table, row))
        if conn.execute(exists).first() is None:
            conn.execute(table.insert(), row)


def _portable_upsert(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    for row in rows:
        if conn.execute(table.update().where(_pk_where(table, row)).values(row)).rowcount == 0:
            conn.execute(table.insert(), row)
