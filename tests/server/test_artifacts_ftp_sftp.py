"""FTP/FTPS and SFTP artifact stores beyond the conformance suite: credentials and host keys, FTPS, servers
without MLSD, what a listing shows while an upload is in flight, cancelled and abandoned transfers, and a
real `runyard server` proxying to each store. Real servers throughout: pyftpdlib and OpenSSH's sshd
(tests/helpers/stores/ftp.py and sftp.py); the stores' files are checked on the servers' own disks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from helpers import databases
from helpers.ports import free_port
from helpers.stores.ftp import FTPServer, ftp_server, vsftpd_server
from helpers.stores.sftp import SSHServer, keygen, sshd

from server.artifacts import repository_for
from server.artifacts.base import CHUNK_SIZE, FileInfo
from server.artifacts.ftp import TMP_PREFIX as FTP_TMP_PREFIX
from server.artifacts.sftp import MAX_SESSIONS
from server.artifacts.sftp import TMP_PREFIX as SFTP_TMP_PREFIX
from server.errors import RunyardError

ARTIFACTS = "/api/2.0/mlflow-artifacts"
ASYNC_TIMEOUT_S = 120  # a hang (a leaked connection) fails the test instead of stalling the run


@contextmanager
def available() -> Iterator[None]:
    try:
        yield
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ftp(tmp_path_factory) -> Iterator[FTPServer]:
    with available(), ftp_server(tmp_path_factory.mktemp("ftp")) as server:
        yield server


@pytest.fixture(scope="module")
def ssh(tmp_path_factory) -> Iterator[SSHServer]:
    with available(), sshd(tmp_path_factory.mktemp("sftp")) as server:
        yield server


@dataclass
class Target:
    """A fresh root in one store: its URI, the environment it needs, and where its files lie on disk."""

    uri: str
    env: dict[str, str]
    disk: Path
    tmp_prefix: str


@pytest.fixture(params=["ftp", "sftp"])
def target(request, monkeypatch) -> Target:
    folder = uuid.uuid4().hex[:10]
    if request.param == "ftp":
        server: FTPServer = request.getfixturevalue("ftp")
        found = Target(server.uri(f"/{folder}"), {}, server.home / folder, FTP_TMP_PREFIX)
    else:
        ssh: SSHServer = request.getfixturevalue("ssh")
        disk = ssh.folder.parent / "files" / folder
        found = Target(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{disk}", ssh.env(), disk, SFTP_TMP_PREFIX)
    for name, value in found.env.items():
        monkeypatch.setenv(name, value)
    return found


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, ASYNC_TIMEOUT_S))


async def chunks_of(*parts: bytes):
    for part in parts:
        yield part


async def read_all(repo, path: str, offset: int = 0, length: int | None = None) -> bytes:
    stream = await repo.open_read(path, offset, length)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


def refused(uri: str, path: str = "x.txt") -> RunyardError:
    """The error an upload to `uri` fails with (the store is closed afterwards)."""
    repo = repository_for(uri)

    async def attempt():
        try:
            await repo.write(path, chunks_of(b"x"))
        finally:
            await repo.aclose()

    with pytest.raises(RunyardError) as caught:
        run(attempt())
    assert caught.value.message.startswith(f"Artifact store {repo.description} ")
    return caught.value


# -- FTP credentials, FTPS, servers without MLSD --------------------------------------------------

def test_ftp_wrong_password_is_refused_without_showing_it(ftp, caplog):
    wrong = f"wrong-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    error = refused(ftp.uri("/denied", password=wrong))
    assert error.error_code == "INTERNAL_ERROR"
    assert "530" in error.message and f"log in as {ftp.user}" in error.message
    for secret in (wrong, ftp.password):
        assert secret not in error.message and secret not in caplog.text
    assert repository_for(ftp.uri("/x", password=wrong)).description == f"ftp://{ftp.user}@127.0.0.1:{ftp.port}/x"


def test_ftp_server_down_is_unavailable_not_refused(ftp):
    port = free_port()  # nothing listens there
    error = refused(f"ftp://{ftp.user}:{ftp.password}@127.0.0.1:{port}/x")
    assert error.error_code == "TEMPORARILY_UNAVAILABLE" and "connect" in error.message
    assert ftp.password not in error.message


def test_ftp_password_with_reserved_characters(tmp_path):
    password = "p@ss:w/rd%#?& ü"
    with available(), ftp_server(tmp_path, password=password) as server:
        repo = repository_for(server.uri("/quoted"))
        assert password not in repo.description
        assert run(repo.write("a.txt", chunks_of(b"quoted"))) == 6
        assert run(read_all(repo, "a.txt")) == b"quoted"
        run(repo.aclose())
        assert (server.home / "quoted" / "a.txt").read_bytes() == b"quoted"


def round_trip(repo, disk: Path) -> None:
    """The core of the contract on one store, checked against the server's own disk."""
    data = os.urandom(CHUNK_SIZE + 4321)
    assert run(repo.write("d/sub/data.bin", chunks_of(data[:1000], data[1000:]))) == len(data)
    assert run(repo.write("d/name with space ü.txt", chunks_of(b"hi"))) == 2
    assert (disk / "d" / "sub" / "data.bin").read_bytes() == data
    assert run(repo.list_dir("d")) == [FileInfo("name with space ü.txt", False, 2), FileInfo("sub", True)]
    assert run(repo.list_dir("d/sub")) == [FileInfo("data.bin", False, len(data))]
    assert run(repo.list_dir("d/sub/data.bin")) == [] and run(repo.list_dir("nope")) == []
    assert run(repo.stat("d/sub/data.bin")) == FileInfo("data.bin", False, len(data))
    assert run(repo.stat("d")) == FileInfo("d", True) and run(repo.stat("d/nope")) is None
    assert run(read_all(repo, "d/sub/data.bin")) == data
    assert run(read_all(repo, "d/sub/data.bin", 10, 5)) == data[10:15]
    assert run(read_all(repo, "d/sub/data.bin", CHUNK_SIZE)) == data[CHUNK_SIZE:]
    with pytest.raises(RunyardError) as caught:
        run(read_all(repo, "d"))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(RunyardError) as caught:
        run(read_all(repo, "d/missing.bin"))
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert run(repo.delete("d")) is True and run(repo.list_dir("")) == []
    assert not (disk / "d").exists()
    run(repo.aclose())


def test_ftps_round_trip_with_a_verified_certificate(tmp_path, monkeypatch):
    # The server refuses plain-text commands and data (tls_control_required, tls_data_required), so a
    # working round trip proves AUTH TLS and PROT P; SSL_CERT_FILE makes its self-signed cert trusted.
    with available(), ftp_server(tmp_path, tls=True) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.certfile))
        repo = repository_for(server.uri("/secure"))
        assert repo.description.startswith("ftps://")
        round_trip(repo, server.home / "secure")
        # plain FTP is turned away by this server: the scheme really decides
        error = refused(server.uri("/secure").replace("ftps://", "ftp://", 1))
        assert server.password not in error.message


def test_ftps_untrusted_certificate_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with available(), ftp_server(tmp_path, tls=True) as server:
        error = refused(server.uri("/secure"))
        assert error.error_code == "INTERNAL_ERROR" and "CERTIFICATE_VERIFY_FAILED" in error.message
        assert server.password not in error.message
        assert not (server.home / "secure").exists()


def test_ftps_against_vsftpd_which_requires_tls_session_reuse(tmp_path, monkeypatch):
    # vsftpd: LIST/SIZE/CWD (no MLSD), and data connections must resume the control connection's TLS
    # session (require_ssl_reuse); ftplib alone does not, and fails with "522 session reuse required".
    with available(), vsftpd_server(tmp_path) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.incoming.parent.parent / "ftps-cert.pem"))
        round_trip(repository_for(server.uri("/vs")), server.incoming / "vs")


def test_ftp_server_without_mlsd_uses_list(tmp_path):
    with available(), ftp_server(tmp_path, mlst=False) as server:
        repo = repository_for(server.uri("/legacy"))
        round_trip(repo, server.home / "legacy")


# -- SFTP host keys and client keys ----------------------------------------------------------------

def test_sftp_unknown_host_key_is_refused(ssh, tmp_path, monkeypatch):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    monkeypatch.setenv("RUNYARD_SFTP_KNOWN_HOSTS", str(known_hosts))
    monkeypatch.setenv("RUNYARD_SFTP_KEY_FILE", str(ssh.client_key))
    error = refused(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{tmp_path}/files")
    assert error.error_code == "INTERNAL_ERROR"
    assert f"host key of 127.0.0.1:{ssh.port}" in error.message and str(known_hosts) in error.message
    assert "ssh-keyscan" in error.message and "SHA256:" in error.message
    assert known_hosts.read_text() == ""  # never added behind the operator's back
    assert not (tmp_path / "files").exists()


def test_sftp_missing_known_hosts_file_is_refused(ssh, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNYARD_SFTP_KNOWN_HOSTS", str(tmp_path / "absent"))
    monkeypatch.setenv("RUNYARD_SFTP_KEY_FILE", str(ssh.client_key))
    error = refused(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{tmp_path}/files")
    assert "is not in" in error.message and not (tmp_path / "absent").exists()


def test_sftp_changed_host_key_is_refused(ssh, tmp_path, monkeypatch):
    impostor = keygen(tmp_path / "impostor")  # what known_hosts says the server's key is
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{ssh.port} {impostor}\n")
    monkeypatch.setenv("RUNYARD_SFTP_KNOWN_HOSTS", str(known_hosts))
    monkeypatch.setenv("RUNYARD_SFTP_KEY_FILE", str(ssh.client_key))
    error = refused(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{tmp_path}/files")
    assert error.error_code == "INTERNAL_ERROR" and "differs from the one in" in error.message
    assert known_hosts.read_text() == f"[127.0.0.1]:{ssh.port} {impostor}\n"
    assert not (tmp_path / "files").exists()


def test_sftp_wrong_client_key_is_refused(ssh, tmp_path, monkeypatch):
    for name, value in ssh.env(key=ssh.other_key).items():
        monkeypatch.setenv(name, value)
    error = refused(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{tmp_path}/files")
    assert error.error_code == "INTERNAL_ERROR" and f"authentication as {ssh.user} failed" in error.message
    assert not (tmp_path / "files").exists()


def test_sftp_round_trip_and_known_hosts_from_env(ssh, tmp_path, monkeypatch):
    for name, value in ssh.env().items():
        monkeypatch.setenv(name, value)
    round_trip(repository_for(f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{tmp_path}/files"), tmp_path / "files")


# -- both stores: in-flight uploads, cancelled and abandoned transfers -----------------------------

def test_temporary_file_is_never_listed_during_a_slow_write(target):
    repo = repository_for(target.uri)
    run(repo.write("d/f.bin", chunks_of(b"old")))
    first_part_sent, finish = asyncio.Event(), asyncio.Event()

    async def slow_source():
        yield b"n" * (CHUNK_SIZE + 1)  # one full batch: it reaches the server before the pause
        first_part_sent.set()
        await finish.wait()
        yield b"ew"

    async def scenario():
        writing = asyncio.create_task(repo.write("d/f.bin", slow_source()))
        await first_part_sent.wait()
        while not any(p.name.startswith(target.tmp_prefix) for p in (target.disk / "d").iterdir()):
            await asyncio.sleep(0.01)  # the upload is on the server's disk, under its temporary name
        during = (await repo.list_dir("d"), await repo.stat("d/f.bin"), await read_all(repo, "d/f.bin"))
        on_disk = sorted(p.name for p in (target.disk / "d").iterdir())
        finish.set()
        await writing
        return during, on_disk

    (listed, stat, content), on_disk = run(scenario())
    assert listed == [FileInfo("f.bin", False, 3)] and stat == FileInfo("f.bin", False, 3)
    assert content == b"old"
    assert len(on_disk) == 2 and on_disk[0].startswith(target.tmp_prefix)  # there, yet never listed
    assert run(read_all(repo, "d/f.bin")) == b"n" * (CHUNK_SIZE + 1) + b"ew"
    assert sorted(p.name for p in (target.disk / "d").iterdir()) == ["f.bin"]
    run(repo.aclose())


def test_cancelled_upload_leaves_nothing_and_frees_its_connection(target):
    repo = repository_for(target.uri)
    started = asyncio.Event()

    async def endless():
        yield b"x" * (CHUNK_SIZE + 1)
        started.set()
        await asyncio.Event().wait()  # a client that stalls until the request is cancelled
        yield b"never"

    async def scenario():
        for _ in range(MAX_SESSIONS + 2):  # more than the session pool holds: each must come back
            started.clear()
            writing = asyncio.create_task(repo.write("c/f.bin", endless()))
            await started.wait()
            writing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writing
        await repo.write("c/after.txt", chunks_of(b"ok"))
        return await read_all(repo, "c/after.txt")

    assert run(scenario()) == b"ok"
    assert sorted(p.name for p in (target.disk / "c").iterdir()) == ["after.txt"]
    run(repo.aclose())


def test_abandoned_and_partial_reads_free_their_connection(target):
    repo = repository_for(target.uri)
    data = os.urandom(3 * CHUNK_SIZE)
    run(repo.write("big.bin", chunks_of(data)))

    async def scenario():
        for round_ in range(MAX_SESSIONS + 2):
            stream = await repo.open_read("big.bin", offset=round_)
            if round_ % 2:  # read part of it, then stop
                chunk = await stream.__aiter__().__anext__()
                assert chunk == data[round_:round_ + len(chunk)]
            await stream.aclose()  # or never iterated at all
        return await read_all(repo, "big.bin", CHUNK_SIZE - 1, 3)

    assert run(scenario()) == data[CHUNK_SIZE - 1:CHUNK_SIZE + 2]
    run(repo.aclose())


# -- through a real `runyard server` --------------------------------------------------------------

def proxy_round_trip(server, disk: Path) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 7)
    url = f"{server.url}{ARTIFACTS}/artifacts/1/run/artifacts/model.bin"
    assert requests.put(url, data=data, timeout=60).status_code == 200
    assert (disk / "1" / "run" / "artifacts" / "model.bin").read_bytes() == data
    answer = requests.get(url, timeout=60)
    assert answer.status_code == 200 and answer.content == data
    ranged = requests.get(url, headers={"Range": "bytes=5-9"}, timeout=60)
    assert ranged.status_code == 206 and ranged.content == data[5:10]
    listed = requests.get(f"{server.url}{ARTIFACTS}/artifacts", params={"path": "1/run/artifacts"},
                          timeout=10)
    assert listed.json() == {"files": [{"path": "model.bin", "is_dir": False, "file_size": len(data)}]}
    assert requests.delete(url, timeout=30).status_code == 200
    assert requests.get(url, timeout=30).status_code == 404


def test_server_proxies_to_ftp_and_keeps_the_password_out_of_answers_and_logs(ftp, server_factory):
    folder = uuid.uuid4().hex[:8]
    server = server_factory(None, "--artifacts-destination", ftp.uri(f"/{folder}"))
    proxy_round_trip(server, ftp.home / folder)

    wrong = f"wrong-{uuid.uuid4().hex}"
    denied = server_factory(None, "--artifacts-destination", ftp.uri(f"/{folder}", password=wrong))
    answer = requests.put(f"{denied.url}{ARTIFACTS}/artifacts/x.txt", data=b"x", timeout=60)
    assert answer.status_code == 500 and "530" in answer.json()["message"]
    for secret in (wrong, ftp.password):
        assert secret not in answer.text and secret not in denied.log() and secret not in server.log()


def test_server_proxies_to_sftp(ssh, server_factory):
    folder = ssh.folder.parent / "files" / uuid.uuid4().hex[:8]
    server = server_factory(None, "--artifacts-destination", f"sftp://{ssh.user}@127.0.0.1:{ssh.port}{folder}",
                            env=ssh.env())
    proxy_round_trip(server, folder)
