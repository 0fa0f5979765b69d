"""Database servers that check passwords, for tests of password handling (rotation, password files).

The machine's PostgreSQL trusts 127.0.0.1, so it would accept any password: `start_scram_postgres()`
starts a throwaway PostgreSQL 15 whose TCP connections need a SCRAM-SHA-256 password, administered over
its Unix socket (trust). MariaDB checks passwords of the accounts it has, so the session's `mysql_server`
serves with a password-protected account (`databases.my_create_user`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from helpers.databases import serve, start_postgres_cluster


@dataclass
class ScramPostgres:
    port: int
    socket_dir: Path  # admin connections (trust) go through the socket; TCP needs a password
    stop: Callable[[], None] = field(default=lambda: None)

    def admin(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True, connect_timeout=3)

    def create_user_and_database(self, user: str, password: str, database: str) -> str:
        """A login role with `password` owning a new database; returns the URI (without the password)."""
        with self.admin() as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user),
                                                                             sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                       sql.Identifier(user)))
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def drop_user_and_database(self, user: str, database: str) -> None:
        with self.admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))


def start_scram_postgres() -> ScramPostgres:
    """initdb --auth-host=scram-sha-256 --auth-local=trust in a temp dir, on a free port."""
    port, workdir, stop = start_postgres_cluster(
        ("--auth-local=trust", "--auth-host=scram-sha-256"),
        "-c password_encryption=scram-sha-256 -c max_connections=200", label="scram")
    return ScramPostgres(port, workdir, stop)


def scram_postgres_server() -> Iterator[ScramPostgres]:
    """For a fixture: a throwaway PostgreSQL whose TCP connections need a password (SCRAM-SHA-256)."""
    return serve(start_scram_postgres)
