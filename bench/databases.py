"""A fresh, empty backend store for every server in every run: SQLite files or PostgreSQL databases."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
PG_URI = "postgresql://postgres@127.0.0.1:5432/{db}"


class SqliteStores:
    name = "sqlite"

    def __init__(self, workdir: Path):
        self.dir = workdir / "sqlite"
        self.dir.mkdir(parents=True, exist_ok=True)

    def create(self, label: str) -> str:
        path = (self.dir / f"{_slug(label)}.db").resolve()
        path.unlink(missing_ok=True)
        return f"sqlite:///{path}"  # absolute path -> four slashes, as both servers expect

    def cleanup(self) -> None:
        pass  # the files stay in bench/.work for inspection; the next run replaces them


class PostgresStores:
    name = "postgresql"

    def __init__(self):
        import psycopg  # project dependency (psycopg 3); imported here so SQLite-only runs never need it

        self._psycopg = psycopg
        self._created: list[str] = []
        self._tag = f"{os.getpid()}_{int(time.time())}"

    def _admin(self):
        return self._psycopg.connect(PG_ADMIN, autocommit=True)

    def version(self) -> str:
        with self._admin() as conn:
            return conn.execute("SHOW server_version").fetchone()[0]

    def create(self, label: str) -> str:
        db = f"bench_{_slug(label)}_{self._tag}"
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}"')
            conn.execute(f'CREATE DATABASE "{db}"')
        self._created.append(db)
        return PG_URI.format(db=db)

    def cleanup(self) -> None:
        # Called after the servers are stopped; FORCE drops any connection a crashed server left.
        with self._admin() as conn:
            for db in self._created:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        self._created.clear()


def postgres_problem() -> str | None:
    """None when PostgreSQL answers on 127.0.0.1:5432, else the reason it cannot be used."""
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed in this venv ({exc})"
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip PostgreSQL", with the reason shown
        return f"PostgreSQL not reachable on 127.0.0.1:5432 as postgres: {str(exc).strip()}"
    return None


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
