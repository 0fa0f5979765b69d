"""Path rules and what only the local store has: containment through symlinks, temporary files, conflicts
between files and folders. The contract every store shares is tests/server/test_artifact_stores.py."""

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


@pytest.mark.parametrize("uri, scheme", [("weird://user:s3cr3t@x/p", "weird"), ("gopher://h/p", "gopher")])
def test_unknown_schemes_are_refused_naming_only_the_scheme(uri, scheme):
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
