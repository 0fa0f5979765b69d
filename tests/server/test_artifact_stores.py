"""The conformance suite: every artifact store behind `server.artifacts.repository_for`, against its real
or emulated server (tests/helpers/stores), held to one contract: the ArtifactRepository docstrings.

Each test gets a fresh, empty root inside the store. Store-specific behaviour (symlinks on local disk,
multipart on S3, Kerberos on HDFS, host keys on SFTP, …) is tested beside each store's own module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest
from helpers import databases
from helpers.bad_paths import BAD_PATHS
from helpers.stores import STORES, StoreUnderTest, running

from server.artifacts import repository_for
from server.artifacts.base import CHUNK_SIZE, FileInfo
from server.errors import RunyardError

LARGE_MB = int(os.environ.get("RUNYARD_TEST_LARGE_MB", "1024"))
# Larger than any store's single-request limit (Azure blocks, GCS chunks, S3 parts are 4-8 MiB), so
# failures and races are tested on the multi-request upload paths too.
MULTI_PART = 2 * 8 * 2**20 + 10
PEAK_RSS_LIMIT_MB = 400  # the interpreter and a cloud SDK take ~150 MB; a buffered 1 GB file would not fit


@pytest.fixture(scope="module", params=STORES)
def store(request, tmp_path_factory) -> StoreUnderTest:
    try:
        with running(request.param, tmp_path_factory.mktemp(request.param)) as started:
            yield started
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


@pytest.fixture
def repo(store, monkeypatch):
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    repository = repository_for(store.root(uuid.uuid4().hex[:12]))
    yield repository
    asyncio.run(repository.aclose())


def run(coroutine):
    return asyncio.run(coroutine)


async def chunks_of(*parts: bytes):
    for part in parts:
        yield part


async def read_all(repo, path, offset=0, length=None) -> bytes:
    stream = await repo.open_read(path, offset, length)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


def put(repo, path, data: bytes) -> int:
    return run(repo.write(path, chunks_of(data)))


def error_code(call) -> str:
    with pytest.raises(RunyardError) as caught:
        run(call())
    return caught.value.error_code


def test_empty_and_small_files_round_trip(repo):
    assert run(repo.list_dir("")) == [] and run(repo.stat("x")) is None
    assert put(repo, "empty.bin", b"") == 0
    assert run(read_all(repo, "empty.bin")) == b""
    assert put(repo, "1/run/artifacts/hello.txt", b"hello") == 5
    assert run(read_all(repo, "1/run/artifacts/hello.txt")) == b"hello"
    assert run(repo.stat("1/run/artifacts/hello.txt")) == FileInfo("hello.txt", False, 5)
    assert run(repo.stat("1/run")) == FileInfo("run", True)
    assert run(repo.stat("empty.bin")) == FileInfo("empty.bin", False, 0)
    assert run(repo.is_dir("1/run")) and run(repo.exists("empty.bin")) and not run(repo.exists("nope"))


def test_names_with_spaces_and_unicode(repo):
    put(repo, "dir with space/ünï cödé + plus.txt", b"u")
    assert run(repo.list_dir("dir with space")) == [FileInfo("ünï cödé + plus.txt", False, 1)]
    assert run(read_all(repo, "dir with space/ünï cödé + plus.txt")) == b"u"


def test_many_small_chunks_and_bounded_read_chunks(repo):
    parts = [bytes([i % 256]) * 1000 for i in range(3000)]  # ~3 MB in 1 kB chunks
    assert run(repo.write("many.bin", chunks_of(*parts))) == 3_000_000

    async def sizes():
        stream = await repo.open_read("many.bin")
        assert stream.size == stream.total_size == 3_000_000
        try:
            return [len(chunk) async for chunk in stream]
        finally:
            await stream.aclose()

    got = run(sizes())
    assert sum(got) == 3_000_000 and max(got) <= CHUNK_SIZE
    assert run(read_all(repo, "many.bin")) == b"".join(parts)


def test_ranged_read(repo):
    put(repo, "r.txt", b"0123456789")
    assert run(read_all(repo, "r.txt", 2, 3)) == b"234"
    assert run(read_all(repo, "r.txt", 8)) == b"89"
    assert run(read_all(repo, "r.txt", 20)) == b""


def test_nested_listing_one_level(repo):
    put(repo, "d/b.txt", b"bb")
    put(repo, "d/a.txt", b"a")
    put(repo, "d/sub/deep/c.txt", b"c")
    assert run(repo.list_dir("d")) == [
        FileInfo("a.txt", False, 1), FileInfo("b.txt", False, 2), FileInfo("sub", True)]
    assert run(repo.list_dir("d/sub")) == [FileInfo("deep", True)]
    assert run(repo.list_dir("")) == [FileInfo("d", True)]
    assert run(repo.list_dir("d/a.txt")) == []  # a file lists as nothing
    assert run(repo.list_dir("missing")) == []


def test_overwrite_replaces_content(repo):
    put(repo, "f.txt", b"first version, longer")
    put(repo, "f.txt", b"second")
    assert run(read_all(repo, "f.txt")) == b"second"
    assert run(repo.stat("f.txt")).size == 6


def test_delete_file_and_directory_tree(repo):
    put(repo, "d/x/1.txt", b"1")
    put(repo, "d/x/y/2.txt", b"2")
    put(repo, "d/keep.txt", b"k")
    assert run(repo.delete("d/keep.txt")) is True
    assert run(repo.delete("d/x")) is True
    assert run(repo.list_dir("d")) == [] and run(repo.stat("d/x/y/2.txt")) is None
    assert run(repo.delete("d/x")) is False
    assert run(repo.delete("nothing/here")) is False


def test_root_cannot_be_deleted(repo):
    put(repo, "a.txt", b"a")
    for path in ("", ".", "./"):
        with pytest.raises(RunyardError):
            run(repo.delete(path))
    assert run(repo.exists("a.txt"))


def test_missing_file_and_directory_reads(repo):
    put(repo, "d/f.txt", b"x")
    assert error_code(lambda: read_all(repo, "d/nope.txt")) == "RESOURCE_DOES_NOT_EXIST"
    assert error_code(lambda: read_all(repo, "d/f.txt/below")) == "RESOURCE_DOES_NOT_EXIST"
    assert error_code(lambda: read_all(repo, "d")) == "INVALID_PARAMETER_VALUE"


async def failing_after(data: bytes):
    yield data
    raise ConnectionResetError("client went away")


def test_failed_write_leaves_nothing(repo):
    with pytest.raises(ConnectionResetError):
        run(repo.write("a/new.bin", failing_after(b"x" * MULTI_PART)))
    assert not run(repo.exists("a/new.bin"))
    assert run(repo.list_dir("a")) == []


def test_failed_overwrite_keeps_the_old_file(repo):
    put(repo, "f.bin", b"old")
    with pytest.raises(ConnectionResetError):
        run(repo.write("f.bin", failing_after(b"new" * (MULTI_PART // 3))))
    assert run(read_all(repo, "f.bin")) == b"old"


def test_concurrent_writers(repo):
    """Writers of one path: each succeeds, or fails cleanly (Azure discards the loser's staged blocks);
    the file is one successful writer's whole content, never a mix. Writers of distinct paths all land."""
    versions = [bytes([65 + i]) * (MULTI_PART + 1000 * i) for i in range(4)]

    async def scenario():
        same = await asyncio.gather(*(repo.write("same.bin", chunks_of(v[:CHUNK_SIZE], v[CHUNK_SIZE:]))
                                      for v in versions), return_exceptions=True)
        await asyncio.gather(*(repo.write(f"own/{i}.bin", chunks_of(v)) for i, v in enumerate(versions)))
        return same

    outcomes = run(scenario())
    assert all(isinstance(o, int | RunyardError) for o in outcomes), outcomes
    landed = [v for v, outcome in zip(versions, outcomes, strict=True) if isinstance(outcome, int)]
    assert landed and run(read_all(repo, "same.bin")) in landed
    for i, version in enumerate(versions):
        assert run(read_all(repo, f"own/{i}.bin")) == version


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_refused_by_every_method(repo, path):
    for call in (lambda: repo.list_dir(path), lambda: repo.stat(path), lambda: read_all(repo, path),
                 lambda: repo.write(path, chunks_of(b"x")), lambda: repo.delete(path)):
        assert error_code(call) == "INVALID_PARAMETER_VALUE"


def test_wrong_credentials_name_the_store_not_the_secret(store, monkeypatch):
    if store.bad_env is None:
        pytest.skip(f"{store.name} has no credentials")
    for name, value in store.bad_env.items():
        monkeypatch.setenv(name, value)
    repository = repository_for(store.root("denied"))
    try:
        with pytest.raises(RunyardError) as caught:
            put(repository, "x.txt", b"x")
    finally:
        run(repository.aclose())
    message = caught.value.message
    assert caught.value.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "PERMISSION_DENIED")
    assert message.startswith("Artifact store ") and repository.description in message
    for secret in store.secrets + tuple(store.bad_env.values()):
        if len(secret) >= 6:
            assert secret not in message


# One large file through the interface in a fresh process, whose peak memory must stay flat.
LARGE_SCRIPT = """
import asyncio, hashlib, json, sys
from server.artifacts import repository_for

size_mb, root = int(sys.argv[1]), sys.argv[2]
block = bytes(range(256)) * 4096  # 1 MiB

async def source():
    for i in range(size_mb):
        yield i.to_bytes(4, "big") + block[4:]

async def main():
    repo = repository_for(root)
    written = await repo.write("large.bin", source())
    digest = hashlib.sha256()
    stream = await repo.open_read("large.bin")
    try:
        async for chunk in stream:
            digest.update(chunk)
    finally:
        await stream.aclose()
    await repo.delete("large.bin")
    await repo.aclose()
    return written, digest.hexdigest()

written, got = asyncio.run(main())
expected = hashlib.sha256()
for i in range(size_mb):
    expected.update(i.to_bytes(4, "big") + block[4:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) pytest process we forked from.
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"written": written, "same": got == expected.hexdigest(), "peak_rss_mb": peak_kb / 1024}))
"""


def test_large_file_round_trip_in_constant_memory(store):
    done = subprocess.run([sys.executable, "-c", LARGE_SCRIPT, str(LARGE_MB), store.root("large")],
                          capture_output=True, text=True, timeout=1800, env={**os.environ, **store.env})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["written"] == LARGE_MB * 2**20 and result["same"] is True
    assert result["peak_rss_mb"] < PEAK_RSS_LIMIT_MB, result
