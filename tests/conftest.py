"""Shared fixtures: real database servers, fresh backend URIs, and `runyard server` processes.

Database servers: the machine's own PostgreSQL (5432) / MariaDB (3306) when they answer, else throwaway
instances (helpers/databases.py). Missing binaries skip the dependent tests, unless RUNYARD_TEST_STRICT=1
(set by .ci/run), where they fail: in CI every database test must run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest
from helpers import databases
from helpers.databases import DatabaseServer
from helpers.ports import free_port  # noqa: F401  (re-exported for tests that want `from conftest import …`)
from helpers.servers import RunningServer, start_server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[DatabaseServer]:
    """A PostgreSQL server for the session; `.base_url` is postgresql://postgres@127.0.0.1:PORT."""
    yield from databases.serve(databases.postgres_server)


@pytest.fixture(scope="session")
def mysql_server() -> Iterator[DatabaseServer]:
    """A MariaDB server for the session; `.base_url` is mysql://root@127.0.0.1:PORT."""
    yield from databases.serve(databases.mysql_server)


@pytest.fixture
def postgres_uri(postgres_server: DatabaseServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards: postgresql://postgres@127.0.0.1:PORT/DB."""
    name = databases.unique_name()
    databases.pg_create_database(postgres_server, name)
    yield postgres_server.uri(name)
    databases.pg_drop_database(postgres_server, name)


@pytest.fixture
def mysql_uri(mysql_server: DatabaseServer) -> Iterator[str]:
    """A fresh, empty MariaDB database, dropped afterwards: mysql://root@127.0.0.1:PORT/DB."""
    name = databases.unique_name()
    databases.my_create_database(mysql_server, name)
    yield mysql_server.uri(name)
    databases.my_drop_database(mysql_server, name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.db),
                        pytest.param("mysql", marks=pytest.mark.db)])
def backend_uri(request, tmp_path) -> str:
    """A fresh backend-store-uri of each kind: an empty folder (embedded SQLite), PostgreSQL, MariaDB."""
    if request.param == "sqlite":
        return str(tmp_path / "store")
    return request.getfixturevalue({"postgresql": "postgres_uri", "mysql": "mysql_uri"}[request.param])


@pytest.fixture
def empty_database_like(request, tmp_path) -> Callable[[str], str]:
    """factory(uri) -> the URI of a new, empty database of the same kind (and server) as `uri`."""
    created: list[tuple[Callable, DatabaseServer, str]] = []

    def factory(uri: str) -> str:
        name = databases.unique_name()
        if uri.startswith("postgresql"):
            server = request.getfixturevalue("postgres_server")
            databases.pg_create_database(server, name)
            created.append((databases.pg_drop_database, server, name))
        elif uri.startswith("mysql"):
            server = request.getfixturevalue("mysql_server")
            databases.my_create_database(server, name)
            created.append((databases.my_drop_database, server, name))
        else:
            return str(tmp_path / name)
        return server.uri(name)

    yield factory
    for drop, server, name in created:
        drop(server, name)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one can write to, root included: a read-only tmpfs (chmod where mounting is denied)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot make a read-only folder: mount denied and root ignores permissions")
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)


@pytest.fixture
def server_factory(tmp_path) -> Iterator[Callable[..., RunningServer]]:
    """Starts `runyard server` processes: factory(backend_uri=None, *extra_flags, workers=1, env=None)."""
    started: list[RunningServer] = []

    def factory(backend_uri: str | None = None, *extra_flags: str, workers: int = 1,
                env: dict | None = None) -> RunningServer:
        server = start_server(tmp_path / f"server{len(started)}", backend_uri, *extra_flags, workers=workers,
                              env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    """One SQLite-backed `runyard server` per test module, for quick API tests."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()
