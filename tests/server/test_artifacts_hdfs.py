"""HDFS beyond the conformance suite: simple auth, Kerberos failures, ticket renewal, HA namenodes from
HADOOP_CONF_DIR, MLFLOW_HDFS_DRIVER, a cancelled upload, and a real `runyard server` on top.

The WebHDFS server here is a PROTOCOL TEST DOUBLE of ours (helpers/webhdfs_server.py), not Hadoop: it
speaks WebHDFS (namenode/datanode legs, RemoteException errors, SPNEGO) over a local folder and has none
of HDFS's semantics: no replication, leases, permissions, quotas, safe mode or real delegation tokens.
Kerberos is real: a throwaway MIT KDC (helpers/kerberos.py), keytabs, tickets that really expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest
import requests
from helpers import webhdfs_server
from helpers.databases import Unavailable
from helpers.ports import free_port, wait_for
from helpers.stores.hdfs import kerberized_hdfs

from server import kerberos
from server.artifacts import hdfs as hdfs_store
from server.artifacts import repository_for
from server.artifacts.base import FileInfo
from server.errors import RunyardError
from server.kerberos import KEYTAB_ENV, PRINCIPAL_ENV, TICKET_CACHE_ENV, USER_ENV

API = "/api/2.0/mlflow-artifacts/artifacts"
CONFIG_ENV = (KEYTAB_ENV, PRINCIPAL_ENV, TICKET_CACHE_ENV, USER_ENV, "HADOOP_USER_NAME", "HADOOP_CONF_DIR",
              "MLFLOW_HDFS_DRIVER", "KRB5_CONFIG", "KRB5CCNAME")


@contextmanager
def available(context):
    """Enters a service context manager; skips (fails under RUNYARD_TEST_STRICT=1) without the binaries."""
    try:
        with context as value:
            yield value
    except Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def kerberized(tmp_path_factory):
    with available(kerberized_hdfs(tmp_path_factory.mktemp("krb-hdfs"))) as service:
        yield service


@pytest.fixture(scope="module")
def simple_server(tmp_path_factory):
    """The WebHDFS server with simple auth, letting in only the user "alice"."""
    server = webhdfs_server.start(tmp_path_factory.mktemp("simple-hdfs") / "root", users=("alice",))
    yield server
    server.stop()


@pytest.fixture
def env(monkeypatch):
    """Sets the store's environment for one test, starting from none of its variables."""
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)

    def apply(values: dict[str, str]) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return apply


def run(coroutine):
    return asyncio.run(coroutine)


async def chunks_of(*parts: bytes):
    for part in parts:
        yield part


async def read_all(repo, path) -> bytes:
    stream = await repo.open_read(path)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


@contextmanager
def opened(uri: str):
    repo = repository_for(uri)
    try:
        yield repo
    finally:
        run(repo.aclose())


def round_trip(repo, name: str = "dir/file.txt", data: bytes = b"payload") -> None:
    assert run(repo.write(name, chunks_of(data))) == len(data)
    assert run(read_all(repo, name)) == data
    folder, _, base = name.rpartition("/")
    assert run(repo.list_dir(folder)) == [FileInfo(base, False, len(data))]
    assert run(repo.delete(name)) is True


def failure(repo) -> RunyardError:
    with pytest.raises(RunyardError) as caught:
        run(repo.write("x.txt", chunks_of(b"x")))
    assert caught.value.message.startswith(f"Artifact store {repo.description} ")
    return caught.value


def unique_root(port: int) -> str:
    return f"hdfs://localhost:{port}/user/t/{uuid.uuid4().hex[:8]}"


# -- simple auth -----------------------------------------------------------------------------------

def test_simple_auth_sends_the_configured_user(simple_server, env):
    env({"HADOOP_USER_NAME": "alice"})
    with opened(unique_root(simple_server.port)) as repo:
        assert repo.tickets is None
        round_trip(repo)
    # MLFLOW_KERBEROS_USER comes first, as in MLflow; the server only lets alice in
    env({"HADOOP_USER_NAME": "bob", USER_ENV: "alice"})
    with opened(unique_root(simple_server.port)) as repo:
        round_trip(repo)
    env({USER_ENV: "mallory"})
    with opened(unique_root(simple_server.port)) as repo:
        error = failure(repo)
    assert error.error_code == "INTERNAL_ERROR" and "AccessControlException" in error.message


def test_an_unreachable_namenode_is_a_503(env):
    with opened(f"hdfs://localhost:{free_port()}/user/t") as repo:
        error = failure(repo)
    assert error.error_code == "TEMPORARILY_UNAVAILABLE"


# -- Kerberos --------------------------------------------------------------------------------------

def test_kerberos_server_without_a_ticket_fails_clearly(kerberized, env, tmp_path):
    env(kerberized.realm.env)
    with opened(kerberized.uri(f"/user/t/{uuid.uuid4().hex[:8]}")) as repo:  # no Kerberos configured
        error = failure(repo)
    assert error.error_code == "INTERNAL_ERROR"
    assert "wants authentication" in error.message and KEYTAB_ENV in error.message

    empty_cache = tmp_path / "empty-ccache"
    env({TICKET_CACHE_ENV: f"FILE:{empty_cache}", USER_ENV: "runyard"})
    with opened(kerberized.uri("/user/t/no-ticket")) as repo:
        error = failure(repo)
    assert error.error_code == "INTERNAL_ERROR" and "no Kerberos ticket in the ticket cache" in error.message
    assert str(empty_cache) not in error.message


def test_ticket_cache_from_kinit(kerberized, env, tmp_path):
    cache = tmp_path / "ccache"
    kerberized.realm.kinit("runyard", kerberized.client_keytab, cache)
    env({**kerberized.realm.env, TICKET_CACHE_ENV: f"FILE:{cache}", USER_ENV: "runyard@TEST.LOCAL"})
    with opened(kerberized.uri(f"/user/t/{uuid.uuid4().hex[:8]}")) as repo:
        round_trip(repo)
        assert repo.tickets.acquisitions == 1


def test_a_principal_the_ticket_cache_does_not_hold_is_refused(kerberized, env, tmp_path):
    cache = tmp_path / "ccache"
    kerberized.realm.kinit("runyard", kerberized.client_keytab, cache)
    env({**kerberized.realm.env, TICKET_CACHE_ENV: f"FILE:{cache}", USER_ENV: "someone-else"})
    with opened(kerberized.uri("/user/t/other")) as repo:
        error = failure(repo)
    assert "Kerberos" in error.message and "someone-else" not in error.message


def test_tickets_are_renewed_while_the_store_keeps_writing(tmp_path, env, monkeypatch):
    """Tickets live 1 minute here. A keytab-backed store writes every 10 s for over three ticket
    lifetimes and never fails: it gets a new ticket before the old one runs out (or once it has). A
    store on a ticket cache kinit'd once, which nobody renews, fails after the ticket expired: without
    renewal the first store would fail the same way."""
    with available(kerberized_hdfs(tmp_path, ticket_lifetime="1m", renewable_lifetime="2m")) as service:
        cache = tmp_path / "one-shot-ccache"
        service.realm.kinit("runyard", service.client_keytab, cache)
        env(service.env())
        keytab_repo = repository_for(service.uri("/user/t/renewed"))
        monkeypatch.delenv(KEYTAB_ENV)
        env({TICKET_CACHE_ENV: f"FILE:{cache}"})
        cache_repo = repository_for(service.uri("/user/t/one-shot"))
        try:
            assert run(cache_repo.write("first.txt", chunks_of(b"while the ticket lasts"))) == 22
            deadline = time.monotonic() + 3.3 * 60  # a wait, not an assertion: three lifetimes and more
            written = 0
            while time.monotonic() < deadline:
                data = f"write {written}".encode()
                assert run(keytab_repo.write(f"w/{written}.txt", chunks_of(data))) == len(data)
                written += 1
                time.sleep(10)
            assert run(read_all(keytab_repo, f"w/{written - 1}.txt")) == f"write {written - 1}".encode()
            assert len(run(keytab_repo.list_dir("w"))) == written
            assert keytab_repo.tickets.acquisitions >= 3  # one ticket per lifetime at least

            error = failure(cache_repo)
            assert error.error_code == "INTERNAL_ERROR" and "expired" in error.message
        finally:
            run(keytab_repo.aclose())
            run(cache_repo.aclose())


def test_a_kdc_outage_is_ridden_out_while_the_ticket_lasts(tmp_path, env, monkeypatch, caplog):
    # Renew at every request, so the outage below hits a renewal without waiting for the ticket to age.
    monkeypatch.setattr(kerberos, "REFRESH_SHARE", 1.0)
    monkeypatch.setattr(kerberos, "REFRESH_MARGIN_S", 10**9)
    with available(kerberized_hdfs(tmp_path)) as service:
        env(service.env())
        with opened(service.uri("/user/t/outage")) as repo:
            round_trip(repo)
            before = repo.tickets.acquisitions
            assert before >= 2  # renewed while the KDC was there
            service.realm.stop()
            with caplog.at_level(logging.WARNING, logger="runyard.server"):
                round_trip(repo, "during/outage.txt", b"still writing")
            assert repo.tickets.acquisitions == before
    assert "could not renew the ticket" in caplog.text and "Cannot contact any KDC" in caplog.text
    assert "runyard@TEST.LOCAL" not in caplog.text and str(service.client_keytab) not in caplog.text


# -- where WebHDFS is: HADOOP_CONF_DIR, HA, viewfs -------------------------------------------------

SITE = """<?xml version="1.0"?>
<configuration>
{}
</configuration>
"""


def write_site(folder, name: str, properties: dict[str, str]) -> None:
    body = "\n".join(f"  <property><name>{key}</name><value>{value}</value></property>"
                     for key, value in properties.items())
    (folder / name).write_text(SITE.format(body))


def ha_conf(folder, first: str, second: str) -> None:
    folder.mkdir(exist_ok=True)
    write_site(folder, "core-site.xml", {
        "fs.defaultFS": "hdfs://ns1",
        "fs.viewfs.mounttable.cluster.link./data": "hdfs://ns1/user/t/viewfs-data",
    })
    write_site(folder, "hdfs-site.xml", {
        "dfs.nameservices": "ns1",
        "dfs.ha.namenodes.ns1": "nn1,nn2",
        "dfs.namenode.rpc-address.ns1.nn1": "first.example:8020",
        "dfs.namenode.rpc-address.ns1.nn2": "second.example:8020",
        "dfs.namenode.http-address.ns1.nn1": first,
        "dfs.namenode.http-address.ns1.nn2": second,
    })


def test_ha_nameservice_falls_over_to_the_second_namenode(simple_server, env, tmp_path):
    conf = tmp_path / "conf"
    ha_conf(conf, f"localhost:{free_port()}", f"localhost:{simple_server.port}")  # nn1 is down
    env({"HADOOP_CONF_DIR": str(conf), "HADOOP_USER_NAME": "alice"})
    with opened("hdfs://ns1/user/t/ha") as repo:
        round_trip(repo, "ha.txt", b"via nn2")
    with opened("hdfs:///user/t/default-fs") as repo:  # fs.defaultFS names the nameservice
        round_trip(repo, "default.txt", b"via fs.defaultFS")
    with opened("viewfs://cluster/data/runs") as repo:
        assert run(repo.write("v.txt", chunks_of(b"mounted"))) == 7
    assert (simple_server.root / "user/t/viewfs-data/runs/v.txt").read_bytes() == b"mounted"


def test_a_standby_namenode_is_skipped(simple_server, env, tmp_path):
    standby = webhdfs_server.start(tmp_path / "standby-root", standby=True)
    try:
        conf = tmp_path / "conf"
        ha_conf(conf, f"localhost:{standby.port}", f"localhost:{simple_server.port}")
        env({"HADOOP_CONF_DIR": str(conf), "HADOOP_USER_NAME": "alice"})
        with opened("hdfs://ns1/user/t/standby") as repo:
            round_trip(repo, "s.txt", b"active only")
        assert not list((tmp_path / "standby-root").iterdir())  # the standby stored nothing
    finally:
        standby.stop()


def test_webhdfs_address_resolution():
    conf = {
        "dfs.nameservices": "ns1", "dfs.ha.namenodes.ns1": "a,b",
        "dfs.namenode.http-address.ns1.a": "nn-a:9870", "dfs.namenode.http-address.ns1.b": "nn-b:9870",
        "dfs.namenode.rpc-address": "single:8020", "dfs.namenode.http-address": "0.0.0.0:50070",
    }
    location = hdfs_store.webhdfs_location
    assert location("hdfs://ns1/p", conf) == (["http://nn-a:9870", "http://nn-b:9870"], "/p")
    assert location("hdfs://single:8020/a/b/", conf) == (["http://single:50070"], "/a/b")
    assert location("hdfs://single/x", conf) == (["http://single:50070"], "/x")  # 8020 by default
    assert location("hdfs://web:14000/x", conf) == (["http://web:14000"], "/x")  # no match: the HTTP address
    assert location("hdfs://web/x", {}) == (["http://web:9870"], "/x")
    https = {**conf, "dfs.http.policy": "HTTPS_ONLY", "dfs.namenode.https-address.ns1.a": "nn-a:9871",
             "dfs.namenode.https-address.ns1.b": "nn-b:9871"}
    assert location("hdfs://ns1/p", https)[0] == ["https://nn-a:9871", "https://nn-b:9871"]
    with pytest.raises(RunyardError, match="fs.defaultFS"):
        location("hdfs:///p", {})
    with pytest.raises(RunyardError, match="mount point"):
        location("viewfs://cluster/p", {})


# -- MLFLOW_HDFS_DRIVER ----------------------------------------------------------------------------

def test_mlflow_hdfs_driver_is_accepted_and_noted_once(simple_server, env, monkeypatch, caplog):
    monkeypatch.setattr(hdfs_store, "_driver_noted", False)
    env({"MLFLOW_HDFS_DRIVER": "libhdfs", "HADOOP_USER_NAME": "alice"})
    with caplog.at_level(logging.INFO, logger="runyard.server"):
        for _ in range(2):
            with opened(unique_root(simple_server.port)) as repo:
                round_trip(repo)
    notes = [r.getMessage() for r in caplog.records if "MLFLOW_HDFS_DRIVER" in r.getMessage()]
    assert notes == ["MLFLOW_HDFS_DRIVER=libhdfs is not needed: runyard uses WebHDFS"]


# -- uploads that stop half way ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cancelled", "body raises"])
def test_an_upload_that_stops_half_way_leaves_no_temporary_file(simple_server, env, how):
    """The listing hides in-flight temporaries, so look in the server's own folder."""
    env({"HADOOP_USER_NAME": "alice"})
    folder = uuid.uuid4().hex[:8]

    async def scenario(repo):
        sent = asyncio.Event()

        async def stops_after_one_block():
            yield b"x" * (2 * 1024 * 1024)
            sent.set()  # the first block is on its way: the temporary file exists on the server
            if how == "body raises":
                raise ConnectionResetError("client went away")
            await asyncio.Event().wait()  # the client stops sending and never comes back

        task = asyncio.create_task(repo.write("c/big.bin", stops_after_one_block()))
        await sent.wait()
        if how == "cancelled":
            task.cancel()
        with pytest.raises(asyncio.CancelledError if how == "cancelled" else ConnectionResetError):
            await task

    with opened(f"hdfs://localhost:{simple_server.port}/user/t/{folder}") as repo:
        run(scenario(repo))
        local = simple_server.root / "user/t" / folder / "c"
        assert local.is_dir()  # the upload got as far as the server
        # a cancelled upload's thread notices on its own and deletes its temporary file
        assert wait_for(lambda: not any(local.iterdir()), timeout=30), list(local.iterdir())
        assert not run(repo.exists("c/big.bin"))


# -- through a real server -------------------------------------------------------------------------

def test_runyard_server_stores_artifacts_on_kerberized_hdfs(kerberized, server_factory):
    uri = kerberized.uri(f"/user/t/{uuid.uuid4().hex[:8]}")
    env = {**kerberized.env(), "MLFLOW_HDFS_DRIVER": "libhdfs3"}
    server = server_factory(None, "--artifacts-destination", uri, env=env)
    payload = os.urandom(3 * 1024 * 1024 + 17)
    put = requests.put(f"{server.url}{API}/1/run/model.bin", data=payload, timeout=60)
    assert put.status_code == 200, put.text
    got = requests.get(f"{server.url}{API}/1/run/model.bin", timeout=60)
    assert got.status_code == 200 and got.content == payload
    listing = requests.get(f"{server.url}{API}", params={"path": "1/run"}, timeout=60).json()
    assert listing == {"files": [{"path": "model.bin", "is_dir": False, "file_size": len(payload)}]}
    missing = requests.get(f"{server.url}{API}/1/run/nope.bin", timeout=60)
    assert missing.status_code == 404
    stored = kerberized.server.root / uri.split(str(kerberized.server.port), 1)[1].lstrip("/")
    assert (stored / "1/run/model.bin").read_bytes() == payload
    log = server.log()
    assert "not needed: runyard uses WebHDFS" in log
    assert str(kerberized.client_keytab) not in log and "runyard@TEST.LOCAL" not in log



NO_GSSAPI = """
import asyncio, sys
sys.modules["gssapi"] = None  # as if the kerberos extra were not installed
from server.artifacts import repository_for
from server.errors import RunyardError

async def body():
    yield b"simple"

async def main(uri):
    repo = repository_for(uri)
    assert await repo.write("f.txt", body()) == 6
    await repo.aclose()

asyncio.run(main(sys.argv[1]))
import os
os.environ["RUNYARD_KERBEROS_KEYTAB"] = "/nonexistent.keytab"
try:
    repository_for(sys.argv[1])
except RunyardError as exc:
    print(exc.error_code, exc.message)
"""


def test_simple_auth_needs_no_kerberos_sdk(simple_server, env):
    done = subprocess.run([sys.executable, "-c", NO_GSSAPI, unique_root(simple_server.port)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HADOOP_USER_NAME": "alice"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("INVALID_STATE ") and "pip install 'runyard[kerberos]'" in done.stdout
