"""toolkit.htpasswd on real files, with real processes for concurrency and a real NGINX checking a hash."""

from __future__ import annotations

import base64
import grp
import multiprocessing
import os
import secrets
import signal
import stat
import subprocess
import traceback
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.ports import free_port, port_open, wait_for

from server.errors import RunyardError
from toolkit import htpasswd

DEFAULT_ROUNDS = htpasswd.BCRYPT_ROUNDS
NGINX = "/usr/sbin/nginx"


@pytest.fixture(autouse=True)
def fast_bcrypt(monkeypatch):
    # Cost 4 (~1 ms a hash) instead of 12 (~250 ms): same format and code paths, a fast suite.
    monkeypatch.setattr(htpasswd, "BCRYPT_ROUNDS", 4)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "htpasswd"


def _error(call, *args, **kwargs) -> RunyardError:
    with pytest.raises(RunyardError) as info:
        call(*args, **kwargs)
    return info.value


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------------
# the operations


def test_round_trip(path: Path):
    htpasswd.add_user(path, "alice", "first-pass")
    htpasswd.add_user(path, "bob", "bobs-pass")
    assert htpasswd.list_users(path) == ["alice", "bob"]
    assert htpasswd.verify(path, "alice", "first-pass")
    assert not htpasswd.verify(path, "alice", "bobs-pass")

    htpasswd.set_password(path, "alice", "second-pass")
    assert htpasswd.verify(path, "alice", "second-pass")
    assert not htpasswd.verify(path, "alice", "first-pass")
    assert htpasswd.verify(path, "bob", "bobs-pass")
    assert htpasswd.list_users(path) == ["alice", "bob"]

    htpasswd.remove_user(path, "alice")
    assert htpasswd.list_users(path) == ["bob"]
    assert not htpasswd.verify(path, "alice", "second-pass")
    htpasswd.remove_user(path, "bob")
    assert htpasswd.list_users(path) == []
    assert path.read_bytes() == b""


def test_lines_are_bcrypt_2y_at_the_configured_cost(path: Path):
    assert DEFAULT_ROUNDS == 12
    htpasswd.add_user(path, "alice", "pw")
    name, hashed = path.read_text().rstrip("\n").split(":", 1)
    assert name == "alice"
    assert hashed.startswith("$2y$04$") and len(hashed) == 60
    assert path.read_text().endswith("\n")


def test_verify(path: Path):
    htpasswd.add_user(path, "alice", "right")
    assert htpasswd.verify(path, "alice", "right")
    assert not htpasswd.verify(path, "alice", "wrong")
    assert not htpasswd.verify(path, "alice", "Right")
    assert not htpasswd.verify(path, "nobody", "right")
    assert not htpasswd.verify(path, "alice", "")
    assert not htpasswd.verify(path, "alice", "right" * 20)  # over 72 bytes: never ours
    assert not htpasswd.verify(path, "bad name", "right")


def test_unicode_names_and_passwords(path: Path):
    htpasswd.add_user(path, "élodie", "pässwörd-✓")
    assert htpasswd.list_users(path) == ["élodie"]
    assert htpasswd.verify(path, "élodie", "pässwörd-✓")
    assert not htpasswd.verify(path, "élodie", "passwortd-✓")


def test_duplicate_and_unknown_users(path: Path):
    htpasswd.add_user(path, "alice", "pw")
    before = path.read_bytes()
    exc = _error(htpasswd.add_user, path, "alice", "other")
    assert exc.error_code == "RESOURCE_ALREADY_EXISTS" and "alice" in exc.message
    exc = _error(htpasswd.set_password, path, "carol", "pw")
    assert exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "carol" in exc.message
    exc = _error(htpasswd.remove_user, path, "carol")
    assert exc.error_code == "RESOURCE_DOES_NOT_EXIST" and "carol" in exc.message
    assert path.read_bytes() == before
    assert htpasswd.verify(path, "alice", "pw")


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope"
    for call, args in [(htpasswd.list_users, ()), (htpasswd.verify, ("alice", "pw")),
                       (htpasswd.set_password, ("alice", "pw")), (htpasswd.remove_user, ("alice",))]:
        exc = _error(call, missing, *args)
        assert exc.error_code == "RESOURCE_DOES_NOT_EXIST" and str(missing) in exc.message
        assert not missing.exists()
    exc = _error(htpasswd.add_user, tmp_path / "no-dir" / "htpasswd", "alice", "pw")
    assert exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.parametrize(("name", "rule"), [
    ("", "empty"),
    ("a" * 256, "at most 255"),
    ("a:b", "':'"),
    ("a b", "whitespace"),
    (" alice", "whitespace"),
    ("alice\t", "whitespace"),
    ("a\nb", "whitespace"),
    ("a\u00a0b", "whitespace"),     # no-break space
    ("a\x00b", "control"),
    ("a\x1bb", "control"),
    ("a\x7fb", "control"),
    ("a\u200bb", "control"),        # zero-width space (a format character)
    ("#alice", "comment"),
])
def test_invalid_names(path: Path, name: str, rule: str):
    htpasswd.add_user(path, "alice", "pw")
    before = path.read_bytes()
    for call, args in [(htpasswd.add_user, (name, "pw")), (htpasswd.set_password, (name, "pw")),
                       (htpasswd.remove_user, (name,))]:
        exc = _error(call, path, *args)
        assert exc.error_code == "INVALID_PARAMETER_VALUE"
        assert "user name" in exc.message and rule in exc.message
    assert path.read_bytes() == before


def test_longest_name_is_accepted(path: Path):
    htpasswd.add_user(path, "a" * 255, "pw")
    assert htpasswd.list_users(path) == ["a" * 255]


@pytest.mark.parametrize(("password", "rule"), [
    ("", "empty"),
    ("a\x00b", "NUL"),
    ("a\nb", "line break"),
    ("a\rb", "line break"),
    ("x" * 73, "72 bytes"),
    ("é" * 37, "72 bytes"),  # 37 characters, 74 bytes
    ("a\udc80b", "Unicode"),  # a lone surrogate cannot be encoded
])
def test_invalid_passwords(path: Path, password: str, rule: str):
    htpasswd.add_user(path, "alice", "pw")
    before = path.read_bytes()
    for call, name in [(htpasswd.add_user, "bob"), (htpasswd.set_password, "alice")]:
        exc = _error(call, path, name, password)
        assert exc.error_code == "INVALID_PARAMETER_VALUE"
        assert "password" in exc.message and rule in exc.message
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


def test_longest_password_is_accepted(path: Path):
    htpasswd.add_user(path, "alice", "x" * 72)
    htpasswd.add_user(path, "bob", "é" * 36)
    assert htpasswd.verify(path, "alice", "x" * 72)
    assert htpasswd.verify(path, "bob", "é" * 36)


def test_unknown_group(path: Path):
    exc = _error(htpasswd.add_user, path, "alice", "pw", group="no-such-group-" + secrets.token_hex(4))
    assert exc.error_code == "INVALID_PARAMETER_VALUE" and "group" in exc.message
    assert not path.exists()


# ----------------------------------------------------------------------------------------------------
# file handling


def test_new_file_is_0600_from_the_start(path: Path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(stat.S_IMODE(os.stat(src).st_mode))  # the temporary file, before it becomes visible
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old_umask = os.umask(0)  # a permissive umask must not widen it
    try:
        htpasswd.add_user(path, "alice", "pw")
    finally:
        os.umask(old_umask)
    assert seen == [0o600]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (path.stat().st_uid, path.stat().st_gid) == (os.geteuid(), os.getegid())
    lock = path.with_name(path.name + ".lock")
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert _leftovers(path.parent) == []


def _other_group() -> grp.struct_group:
    """A group other than ours when we may hand files to it (root), else our own."""
    if os.geteuid() == 0:
        for group in grp.getgrall():
            if group.gr_gid != os.getegid():
                return group
    return grp.getgrgid(os.getegid())


def test_group_gives_0640_and_that_group(path: Path):
    group = _other_group()
    htpasswd.add_user(path, "alice", "pw", group=group.gr_name)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid
    htpasswd.set_password(path, "alice", "pw2")
    htpasswd.add_user(path, "bob", "pw")
    htpasswd.remove_user(path, "bob")
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid
    assert htpasswd.verify(path, "alice", "pw2")


def test_rewrite_keeps_mode_owner_and_group(path: Path):
    htpasswd.add_user(path, "alice", "pw")
    group = _other_group()
    owner = 65534 if os.geteuid() == 0 else os.geteuid()  # nobody, when we may
    os.chown(path, owner, group.gr_gid)
    os.chmod(path, 0o604)
    for edit in (lambda: htpasswd.set_password(path, "alice", "pw2"),
                 lambda: htpasswd.add_user(path, "bob", "pw"),
                 lambda: htpasswd.remove_user(path, "bob")):
        edit()
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o604, owner, group.gr_gid)
    assert htpasswd.list_users(path) == ["alice"]


def test_symlink_edits_the_target(tmp_path: Path):
    real = tmp_path / "real" / "htpasswd"
    real.parent.mkdir()
    link = tmp_path / "htpasswd"
    link.symlink_to(real)
    htpasswd.add_user(link, "alice", "pw")
    htpasswd.add_user(link, "bob", "pw")
    assert link.is_symlink()
    assert htpasswd.list_users(real) == ["alice", "bob"]


OTHER_LINES = (
    b"# managed by hand: keep this comment\n"
    b"\n"
    b"legacy:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n"
    b"sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"
    b"alice:$2y$04$abcdefghijklmnopqrstuu5Wpu1lC0n3XQsc0Cz4jPBHRVBPQvkO6\n"
    b"crlf:{PLAIN}secret\r\n"
    b"  odd line without a colon \xff\n"
    b"last:$6$salt$hash-without-a-final-newline"
)


def test_other_lines_are_preserved(path: Path):
    path.write_bytes(OTHER_LINES)
    assert htpasswd.list_users(path) == ["legacy", "sha", "alice", "crlf", "last"]

    htpasswd.add_user(path, "bob", "pw")
    content = path.read_bytes()
    assert content.startswith(OTHER_LINES + b"\n" + b"bob:$2y$")
    assert content.count(b"\n") == OTHER_LINES.count(b"\n") + 2

    htpasswd.set_password(path, "alice", "new")
    htpasswd.set_password(path, "crlf", "new")
    lines = path.read_bytes().splitlines(keepends=True)
    expected = OTHER_LINES.splitlines(keepends=True)
    assert lines[:4] == expected[:4]
    assert lines[4].startswith(b"alice:$2y$04$") and lines[4] != expected[4] and lines[4].endswith(b"\n")
    assert lines[5].startswith(b"crlf:$2y$04$") and lines[5].endswith(b"\r\n")
    assert lines[6] == expected[6]
    assert lines[7] == expected[7] + b"\n"

    htpasswd.remove_user(path, "bob")
    htpasswd.remove_user(path, "alice")
    htpasswd.remove_user(path, "crlf")
    assert path.read_bytes() == b"".join(expected[i] for i in (0, 1, 2, 3, 6)) + expected[7] + b"\n"
    assert htpasswd.list_users(path) == ["legacy", "sha", "last"]


def test_verify_other_formats_is_false(path: Path):
    path.write_bytes(OTHER_LINES)
    assert not htpasswd.verify(path, "crlf", "secret")  # {PLAIN}: not bcrypt, so False by contract
    assert not htpasswd.verify(path, "legacy", "anything")
    assert not htpasswd.verify(path, "alice", "anything")  # a malformed bcrypt hash


def test_duplicate_lines_of_one_user(path: Path):
    path.write_bytes(b"dup:{PLAIN}one\nother:{PLAIN}x\ndup:{PLAIN}two\n")
    assert htpasswd.list_users(path) == ["dup", "other"]
    htpasswd.set_password(path, "dup", "pw")
    lines = path.read_bytes().splitlines()
    assert [line.split(b":")[0] for line in lines] == [b"dup", b"other"]
    assert htpasswd.verify(path, "dup", "pw")

    path.write_bytes(b"dup:{PLAIN}one\nother:{PLAIN}x\ndup:{PLAIN}two\n")
    htpasswd.remove_user(path, "dup")  # every line, or the second would still let "dup" in
    assert path.read_bytes() == b"other:{PLAIN}x\n"


# ----------------------------------------------------------------------------------------------------
# crash safety and secrecy


@pytest.mark.parametrize("failure", ["fsync", "replace", "interrupt"])
def test_failed_write_leaves_the_old_file(path: Path, monkeypatch, failure: str):
    htpasswd.add_user(path, "alice", "pw")
    before = path.read_bytes()
    before_stat = path.stat()

    def boom(*args, **kwargs):
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, failure if failure != "interrupt" else "fsync", boom)
        if failure == "interrupt":
            with pytest.raises(KeyboardInterrupt):
                htpasswd.set_password(path, "alice", "new")
        else:
            exc = _error(htpasswd.set_password, path, "alice", "new")
            assert exc.error_code == "INVALID_STATE"
            assert str(path) in exc.message and "No space left" in exc.message

    assert path.read_bytes() == before
    assert path.stat().st_ino == before_stat.st_ino
    assert _leftovers(path.parent) == []
    assert htpasswd.verify(path, "alice", "pw")
    htpasswd.set_password(path, "alice", "new")  # the lock was released
    assert htpasswd.verify(path, "alice", "new")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(path: Path):
    htpasswd.add_user(path, "alice", "pw")
    before = path.read_bytes()
    path.parent.chmod(0o500)
    try:
        exc = _error(htpasswd.set_password, path, "alice", "new")
    finally:
        path.parent.chmod(0o700)
    assert exc.error_code == "PERMISSION_DENIED"
    assert path.read_bytes() == before and _leftovers(path.parent) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file owned by another user")
def test_refuses_to_change_the_owner(path: Path, monkeypatch):
    # An operator without the right to keep the owner (simulated: chown fails as for a non-root user)
    # gets an error, not a file silently handed to themselves.
    htpasswd.add_user(path, "alice", "pw")
    os.chown(path, 65534, os.getegid())
    before = path.read_bytes()

    def no_chown(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", no_chown)
    exc = _error(htpasswd.set_password, path, "alice", "new")
    assert exc.error_code == "PERMISSION_DENIED" and str(path) in exc.message
    assert path.read_bytes() == before and path.stat().st_uid == 65534
    assert _leftovers(path.parent) == []


def test_password_never_in_errors(path: Path, monkeypatch):
    secret = "Sekr1t-" + secrets.token_hex(8)
    htpasswd.add_user(path, "alice", "pw")
    errors = [
        _error(htpasswd.add_user, path, "alice", secret),
        _error(htpasswd.add_user, path, "bad:name", secret),
        _error(htpasswd.add_user, path, "bob", secret, group="no-such-group-x"),
        _error(htpasswd.set_password, path, "carol", secret),
        _error(htpasswd.set_password, path, "alice", secret * 8),
        _error(htpasswd.set_password, path, "alice", secret + "\n"),
        _error(htpasswd.set_password, path, "alice", secret + "\x00"),
        _error(htpasswd.set_password, path, "alice", secret + "\udc80"),
        _error(htpasswd.set_password, path.parent / "missing", "alice", secret),
    ]
    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        errors.append(_error(htpasswd.set_password, path, "alice", secret))
    for exc in errors:
        rendered = "".join(traceback.format_exception(exc))  # with any chained exception shown
        assert secret not in rendered and secret[:8] not in rendered
        assert secret not in repr(exc.args)


# ----------------------------------------------------------------------------------------------------
# concurrency


def _add_users(path: str, worker: int, count: int, start) -> None:
    htpasswd.BCRYPT_ROUNDS = 4
    start.wait()
    for i in range(count):
        htpasswd.add_user(path, f"user-{worker}-{i}", f"pw-{worker}-{i}")
        htpasswd.set_password(path, f"user-{worker}-{i}", f"new-{worker}-{i}")


def test_concurrent_edits_lose_nothing(path: Path):
    workers, count = 8, 5
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_add_users, args=(str(path), w, count, start)) for w in range(workers)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * workers

    names = htpasswd.list_users(path)
    assert sorted(names) == sorted(f"user-{w}-{i}" for w in range(workers) for i in range(count))
    assert len(path.read_bytes().splitlines()) == workers * count
    assert all(htpasswd.verify(path, f"user-{w}-{i}", f"new-{w}-{i}")
               for w in range(workers) for i in range(count))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _leftovers(path.parent) == []


# ----------------------------------------------------------------------------------------------------
# real NGINX


def _status(url: str, user: str, password: str) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_nginx_accepts_the_hash(tmp_path: Path):
    if not os.access(NGINX, os.X_OK):
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{NGINX} is missing (RUNYARD_TEST_STRICT=1)")
        pytest.skip(f"{NGINX} is not installed")
    d = tmp_path
    users = d / "htpasswd"
    htpasswd.add_user(users, "alice", "right horse battery")
    htpasswd.add_user(users, "bob", "other")
    htpasswd.set_password(users, "bob", "changed")
    (d / "www").mkdir()
    (d / "www" / "ok.txt").write_text("ok\n")
    port = free_port()
    user_line = "user root;" if os.geteuid() == 0 else ""  # workers would run as nobody otherwise
    (d / "nginx.conf").write_text(f"""
{user_line}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/client_body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    # A static file, not `return 200`: `return` runs in the rewrite phase, before auth_basic (access
    # phase) is consulted, and would answer 200 to any password.
    location / {{ auth_basic "runyard"; auth_basic_user_file {users}; root {d}/www; }}
  }}
}}
""")
    args = [NGINX, "-p", str(d), "-e", f"{d}/error.log", "-c", f"{d}/nginx.conf"]
    proc = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=10)
        assert proc.poll() is None, (d / "error.log").read_text()
        url = f"http://127.0.0.1:{port}/ok.txt"
        assert _status(url, "alice", "right horse battery") == 200
        assert _status(url, "alice", "wrong") == 401
        assert _status(url, "nobody", "right horse battery") == 401
        assert _status(url, "bob", "changed") == 200
        assert _status(url, "bob", "other") == 401
        htpasswd.remove_user(users, "alice")  # read per request: no reload needed
        assert _status(url, "alice", "right horse battery") == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "crypt_r() failed" not in (d / "error.log").read_text()
