"""Path rules and the local artifact store: containment (incl. symlinks), round trips, atomic writes."""

from __future__ import annotations

import asyncio
import os

import pytest
from helpers.bad_paths import BAD_PATHS

from server.artifacts import repository_for
from server.artifacts.base import CHUNK_SIZE, FileInfo, safe_file_path, safe_relative_path
from server.artifacts.local import TMP_PREFIX, LocalArtifactRepository
from server.errors import RunyardError

# Each of these must be refused on every route of every store.


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


def assert_invalid(excinfo):
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    assert excinfo.value.message.startswith("Invalid path")


# -- safe_relative_path ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_refused(path):
    with pytest.raises(RunyardError) as excinfo:
        safe_relative_path(path)
    assert_invalid(excinfo)


@pytest.mark.parametrize("path, expected", [
    ("", ""),
    (".", ""),
    ("./", ""),
    ("a", "a"),
    ("a/b/c.txt", "a/b/c.txt"),
    ("a//b/./c/", "a/b/c"),
    ("1/abc/artifacts/model/MLmodel", "1/abc/artifacts/model/MLmodel"),
    ("a%20b/c%2Fd", "a b/c/d"),
    ("...", "..."),
    ("a..b/..c", "a..b/..c"),
    ("dir/C:x", "dir/C:x"),  # a colon is harmless after the first segment
    ("ünï cødé/файл.txt", "ünï cødé/файл.txt"),
])
def test_good_paths_are_normalised(path, expected):
    assert safe_relative_path(path) == expected


@pytest.mark.parametrize("path", ["", "/", "a/", "a/b/", "a/.", "a%2F", "a%252F"])
def test_file_paths_must_name_a_file(path):
    with pytest.raises(RunyardError) as excinfo:
        safe_file_path(path)
    assert_invalid(excinfo)


def test_file_path_normalises():
    assert safe_file_path("a//b/./c.txt") == "a/b/c.txt"


# -- repository_for --------------------------------------------------------------------------------

def test_plain_path_and_file_uri_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repository_for("mlartifacts").root == str(tmp_path / "mlartifacts")
    assert repository_for(str(tmp_path / "a")).root == str(tmp_path / "a")
    assert repository_for(f"file://{tmp_path}/b").root == str(tmp_path / "b")
    assert repository_for(f"file://localhost{tmp_path}/c").root == str(tmp_path / "c")
    assert repository_for("file:rel").root == str(tmp_path / "rel")
    assert isinstance(repository_for("mlartifacts"), LocalArtifactRepository)


@pytest.mark.parametrize("uri, scheme", [
    ("s3://bucket/prefix", "s3"),
    ("gs://bucket/p", "gs"),
    ("hdfs://nn:8020/p", "hdfs"),
    ("wasbs://c@acct.blob.core.windows.net/p", "wasbs"),
    ("sftp://user@host/p", "sftp"),
    ("ftp://user:s3cr3t@host/p", "ftp"),
    ("weird://x", "weird"),
])
def test_other_schemes_are_not_supported_yet(uri, scheme):
    with pytest.raises(RunyardError) as excinfo:
        repository_for(uri)
    assert excinfo.value.error_code == "INVALID_STATE"
    assert f"'{scheme}'" in excinfo.value.message
    assert "s3cr3t" not in excinfo.value.message and "user" not in excinfo.value.message


def test_file_uri_with_a_remote_host_is_refused():
    with pytest.raises(RunyardError):
        repository_for("file://otherhost/srv/a")


# -- local store: round trips ----------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path) -> LocalArtifactRepository:
    return LocalArtifactRepository(tmp_path / "root")


def test_root_is_created_on_first_write(repo):
    assert not os.path.exists(repo.root)
    assert run(repo.list_dir("")) == []
    assert run(repo.stat("x")) is None
    put(repo, "x", b"1")
    assert os.path.isdir(repo.root)


def test_empty_and_small_files_round_trip(repo):
    assert put(repo, "empty.bin", b"") == 0
    assert run(read_all(repo, "empty.bin")) == b""
    assert put(repo, "1/run/artifacts/hello.txt", b"hello") == 5
    assert run(read_all(repo, "1/run/artifacts/hello.txt")) == b"hello"
    assert run(repo.stat("1/run/artifacts/hello.txt")) == FileInfo("hello.txt", False, 5)
    assert run(repo.stat("1/run")) == FileInfo("run", True)
    assert run(repo.is_dir("1/run")) and run(repo.exists("empty.bin"))
    assert not run(repo.exists("nope"))


def test_write_batches_small_chunks(repo):
    parts = [bytes([i % 256]) * 1000 for i in range(3000)]  # ~3 MB in 1 kB chunks
    assert run(repo.write("many.bin", chunks_of(*parts))) == 3_000_000
    assert run(read_all(repo, "many.bin")) == b"".join(parts)


def test_reads_stream_in_bounded_chunks(repo):
    data = os.urandom(CHUNK_SIZE * 2 + 123)
    put(repo, "big.bin", data)

    async def sizes():
        stream = await repo.open_read("big.bin")
        assert stream.size == stream.total_size == len(data)
        try:
            return [len(chunk) async for chunk in stream]
        finally:
            await stream.aclose()

    got = run(sizes())
    assert sum(got) == len(data) and max(got) <= CHUNK_SIZE


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


def test_delete_file_and_directory_tree(repo):
    put(repo, "d/x/1.txt", b"1")
    put(repo, "d/x/y/2.txt", b"2")
    put(repo, "d/keep.txt", b"k")
    assert run(repo.delete("d/keep.txt")) is True
    assert run(repo.delete("d/x")) is True
    assert run(repo.list_dir("d")) == []
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
    with pytest.raises(RunyardError) as excinfo:
        run(read_all(repo, "d/nope.txt"))
    assert excinfo.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(RunyardError) as excinfo:
        run(read_all(repo, "d/f.txt/below"))  # a file used as a folder is simply missing
    assert excinfo.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(RunyardError) as excinfo:
        run(read_all(repo, "d"))
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"


def test_write_conflicts_with_existing_entries(repo):
    put(repo, "d/f.txt", b"x")
    with pytest.raises(RunyardError) as excinfo:
        put(repo, "d", b"over a folder")
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(RunyardError) as excinfo:
        put(repo, "d/f.txt/under", b"under a file")
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(RunyardError):
        put(repo, "d/", b"no name")
    assert run(read_all(repo, "d/f.txt")) == b"x"


def test_over_long_name_is_a_client_error(repo):
    with pytest.raises(RunyardError) as excinfo:
        put(repo, "x" * 300, b"1")
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"


# -- atomic writes ---------------------------------------------------------------------------------

def leftovers(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.startswith(TMP_PREFIX)]


async def failing_after(data: bytes):
    yield data
    raise ConnectionResetError("client went away")


def test_failed_write_leaves_nothing(repo):
    with pytest.raises(ConnectionResetError):
        run(repo.write("a/new.bin", failing_after(b"x" * (CHUNK_SIZE + 10))))
    assert not run(repo.exists("a/new.bin"))
    assert leftovers(repo.root) == []


def test_failed_overwrite_keeps_the_old_file(repo):
    put(repo, "f.bin", b"old")
    with pytest.raises(ConnectionResetError):
        run(repo.write("f.bin", failing_after(b"new" * 1000)))
    assert run(read_all(repo, "f.bin")) == b"old"
    assert leftovers(repo.root) == []


def test_cancelled_write_leaves_nothing(repo):
    async def scenario():
        started = asyncio.Event()

        async def endless():
            while True:
                yield b"z" * 65536
                started.set()
                await asyncio.sleep(0)

        task = asyncio.create_task(repo.write("c.bin", endless()))
        await started.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert not run(repo.exists("c.bin"))
    assert leftovers(repo.root) == []


def test_readers_see_old_or_whole_new_file_and_listing_hides_uploads(repo):
    put(repo, "f.txt", b"old")

    async def scenario():
        release = asyncio.Event()

        async def slow():
            yield b"new-" * 100
            await release.wait()
            yield b"end"

        writer = asyncio.create_task(repo.write("f.txt", slow()))
        while not leftovers(repo.root):
            await asyncio.sleep(0.01)
        during = await read_all(repo, "f.txt")
        listing = await repo.list_dir("")
        release.set()
        await writer
        return during, listing

    during, listing = run(scenario())
    assert during == b"old"
    assert listing == [FileInfo("f.txt", False, 3)]
    assert run(read_all(repo, "f.txt")) == b"new-" * 100 + b"end"


# -- containment -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_refused_by_every_store_method(repo, path):
    for call in (lambda: repo.list_dir(path), lambda: repo.stat(path), lambda: read_all(repo, path),
                 lambda: repo.write(path, chunks_of(b"x")), lambda: repo.delete(path)):
        with pytest.raises(RunyardError) as excinfo:
            run(call())
        assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"


@pytest.fixture
def escape(tmp_path, repo):
    """A root holding links that lead outside it, next to a folder of secrets."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    put(repo, "d/ok.txt", b"ok")
    root = tmp_path / "root"
    os.symlink(outside, root / "out")
    os.symlink(outside / "secret.txt", root / "secret-link")
    os.symlink(outside, root / "d" / "nested-out")
    return outside


@pytest.mark.parametrize("path", ["out/secret.txt", "secret-link", "d/nested-out/secret.txt"])
def test_symlink_escape_refused_for_read(repo, escape, path):
    with pytest.raises(RunyardError) as excinfo:
        run(read_all(repo, path))
    assert_invalid(excinfo)
    with pytest.raises(RunyardError):
        run(repo.stat(path))


@pytest.mark.parametrize("path", ["out/new.txt", "out/sub/new.txt", "secret-link", "d/nested-out/secret.txt"])
def test_symlink_escape_refused_for_write(repo, escape, path):
    with pytest.raises(RunyardError) as excinfo:
        put(repo, path, b"pwned")
    assert_invalid(excinfo)
    assert sorted(os.listdir(escape)) == ["secret.txt"]
    assert (escape / "secret.txt").read_text() == "secret"


def test_symlink_escape_refused_for_list(repo, escape):
    for path in ("out", "d/nested-out"):
        with pytest.raises(RunyardError) as excinfo:
            run(repo.list_dir(path))
        assert_invalid(excinfo)
    # Links that leave the root are not even shown.
    assert run(repo.list_dir("")) == [FileInfo("d", True)]
    assert run(repo.list_dir("d")) == [FileInfo("ok.txt", False, 2)]


@pytest.mark.parametrize("path", ["out/secret.txt", "out", "secret-link", "d/nested-out/secret.txt"])
def test_symlink_escape_refused_for_delete(repo, escape, path):
    with pytest.raises(RunyardError) as excinfo:
        run(repo.delete(path))
    assert_invalid(excinfo)
    assert (escape / "secret.txt").read_text() == "secret"


def test_deleting_a_tree_does_not_follow_links_out(repo, escape):
    assert run(repo.delete("d")) is True
    assert (escape / "secret.txt").read_text() == "secret"


def test_root_reached_through_a_symlink_works(tmp_path):
    real = tmp_path / "real-root"
    real.mkdir()
    os.symlink(real, tmp_path / "root-link")
    repo = LocalArtifactRepository(tmp_path / "root-link")
    put(repo, "a/b.txt", b"b")
    assert (real / "a" / "b.txt").read_bytes() == b"b"
    assert run(repo.list_dir("a")) == [FileInfo("b.txt", False, 1)]


def test_links_that_stay_inside_the_root_are_followed(repo):
    put(repo, "real/f.txt", b"inside")
    os.symlink(os.path.join(repo.root, "real"), os.path.join(repo.root, "alias"))
    assert run(read_all(repo, "alias/f.txt")) == b"inside"
    assert run(repo.list_dir("")) == [FileInfo("alias", True), FileInfo("real", True)]
    put(repo, "alias/g.txt", b"via alias")
    assert run(read_all(repo, "real/g.txt")) == b"via alias"
    assert run(repo.delete("alias")) is True  # removes the link, not the folder it names
    assert run(read_all(repo, "real/f.txt")) == b"inside"
