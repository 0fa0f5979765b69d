"""The htpasswd file of basic-auth users (`runyard server --htpasswd`, checked for NGINX's auth_request by
`server/passwords.py`): add, re-password, remove and list users.

One `name:hash` line per user, except during a password rotation (`runyard rotate htpasswd`, through
`add_password` and `remove_hashes`): then a user has a line per password, and any of them lets the user
in (`server/passwords.py`, and `verify` here). New hashes are bcrypt written as `$2y$` (what Apache's
`htpasswd -B` writes, so the file also works with NGINX's own auth_basic, which consults a user's first
line only). Every other line (comments, blank lines, other users, other hash formats such as `$apr1$` or
`{SHA}`) is kept byte for byte.

Edits are read-modify-write under an exclusive `flock` on `<file>.lock` (so concurrent edits never lose
an update), and the new content is written to a temporary file in the same directory, fsynced and renamed
over the old one: a server reading the file sees the old file or the new one, never a partial one, and
notices the new one on its next request. New files are created 0600 (0640 with `group`, for a reader
running as another user); a rewritten file keeps its mode, owner and group.

A password is never put in an error message, and no exception raised here chains one that could hold it.
"""

from __future__ import annotations

import fcntl
import grp
import os
import stat
import unicodedata
from collections.abc import Callable
from pathlib import Path

import bcrypt

from server.errors import RunyardError
from toolkit.files import FolderNotWritable, os_error, replace_atomically

# bcrypt cost factor: 2**12 rounds, about a quarter of a second per hash on a current CPU. Tests lower it
# by patching this constant (cost 4, about a millisecond) so they stay fast; there is deliberately no
# environment override, so a production file can never be written with a weak cost by accident.
BCRYPT_ROUNDS = 12
MAX_NAME_CHARS = 255
MAX_PASSWORD_BYTES = 72  # bcrypt ignores everything past 72 bytes; we refuse rather than truncate
_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$")
_LINE_ENDINGS = b"\r\n"


# ----------------------------------------------------------------------------------------------------
# public operations


def add_user(path: str | os.PathLike[str], name: str, password: str, group: str | None = None) -> None:
    """Adds `name` with a bcrypt hash of `password`, creating the file (0600) when it does not exist.

    With `group` (a group name or numeric id), the file is given that group and mode 0640 so a
    server running as another user can read it. Raises RESOURCE_ALREADY_EXISTS when the user is present.
    """
    key = _check_name(name)
    secret = _check_password(password)
    gid = _group_id(group) if group is not None else None
    line = key + b":" + _hash(secret)  # hashing is slow: done before taking the lock
    target = _resolve(path)

    def edit(lines: list[bytes]) -> list[bytes]:
        if _find(lines, key):
            raise RunyardError(f"user {name!r} already exists in {target}", "RESOURCE_ALREADY_EXISTS")
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        return [*lines, line + b"\n"]

    _update(target, edit, create=True, gid=gid)


def set_password(path: str | os.PathLike[str], name: str, password: str) -> None:
    """Replaces the hash of an existing user (RESOURCE_DOES_NOT_EXIST when absent).

    Should the file hold the user more than once (a rotation in progress, a hand edit), the first line is
    rewritten and the later ones dropped: afterwards this password, and only this one, lets the user in.
    """
    key = _check_name(name)
    secret = _check_password(password)
    new_line = key + b":" + _hash(secret)
    target = _resolve(path)

    def edit(lines: list[bytes]) -> list[bytes]:
        found = _find(lines, key)
        if not found:
            raise _no_user(name, target)
        first = found[0]
        ending = lines[first][len(lines[first].rstrip(_LINE_ENDINGS)):] or b"\n"
        out = list(lines)
        out[first] = new_line + ending
        return [line for i, line in enumerate(out) if i not in found[1:]]

    _update(target, edit, create=False)


def remove_user(path: str | os.PathLike[str], name: str) -> None:
    """Removes every line of `name` (RESOURCE_DOES_NOT_EXIST when absent): a duplicate left behind would
    let the removed user in."""
    key = _check_name(name)
    target = _resolve(path)

    def edit(lines: list[bytes]) -> list[bytes]:
        found = set(_find(lines, key))
        if not found:
            raise _no_user(name, target)
        return [line for i, line in enumerate(lines) if i not in found]

    _update(target, edit, create=False)


def password_hashes(path: str | os.PathLike[str], name: str) -> list[str]:
    """The hashes of `name`'s lines, in file order (any format; one per line, so a user in the middle of a
    rotation has two). RESOURCE_DOES_NOT_EXIST when the file or the user is absent."""
    key = _check_name(name)
    target = _resolve(path)
    lines = _read(target, missing_ok=False) or []
    found = _find(lines, key)
    if not found:
        raise _no_user(name, target)
    # latin-1: any byte maps to one character and back, so `remove_hashes` finds exactly these lines
    return [_entry(lines[i])[1].decode("latin-1") for i in found]  # type: ignore[index]


def add_password(path: str | os.PathLike[str], name: str, password: str) -> str:
    """Adds another line for an existing user (RESOURCE_DOES_NOT_EXIST when absent), so that both the
    password(s) the user had and `password` let the user in. Returns the new line's hash: the handle
    `remove_hashes` takes to undo this, or to drop the older lines once clients have moved over."""
    key = _check_name(name)
    secret = _check_password(password)
    hashed = _hash(secret)
    _append(path, name, key, [hashed])
    return hashed.decode("ascii")


def add_hashes(path: str | os.PathLike[str], name: str, hashes: list[str]) -> None:
    """Appends lines for an existing user with hashes taken from this file earlier (`password_hashes`):
    puts back lines `remove_hashes` took away."""
    key = _check_name(name)
    encoded = []
    for hashed in hashes:
        if not isinstance(hashed, str) or not hashed or any(c in hashed for c in "\r\n\x00") \
                or any(ord(c) > 0xFF for c in hashed):
            raise _invalid("a password hash must be one non-empty line, as `password_hashes` returns it")
        encoded.append(hashed.encode("latin-1"))
    _append(path, name, key, encoded)


def remove_hashes(path: str | os.PathLike[str], name: str, hashes: list[str]) -> int:
    """Removes the lines of `name` whose hash is one of `hashes`; returns how many went. Refuses
    (INVALID_STATE) to remove every line of the user: that is `remove_user`. RESOURCE_DOES_NOT_EXIST when
    the user is absent."""
    key = _check_name(name)
    wanted = {h.encode("latin-1", "replace") for h in hashes}
    target = _resolve(path)
    removed = 0

    def edit(lines: list[bytes]) -> list[bytes]:
        nonlocal removed
        found = _find(lines, key)
        if not found:
            raise _no_user(name, target)
        drop = {i for i in found if _entry(lines[i])[1] in wanted}  # type: ignore[index]
        if drop and len(drop) == len(found):
            raise RunyardError(f"refusing to remove every password of user {name!r} in {target}; "
                               "`runyard users remove` removes a user", "INVALID_STATE")
        removed = len(drop)
        return [line for i, line in enumerate(lines) if i not in drop]

    _update(target, edit, create=False)
    return removed


def list_users(path: str | os.PathLike[str]) -> list[str]:
    """User names in file order (each once). A missing file is RESOURCE_DOES_NOT_EXIST."""
    names: list[str] = []
    for line in _read(_resolve(path), missing_ok=False) or []:
        entry = _entry(line)
        if entry is not None:
            name = entry[0].decode("utf-8", "replace")
            if name not in names:
                names.append(name)
    return names


def verify(path: str | os.PathLike[str], name: str, password: str) -> bool:
    """True when `password` matches one of `name`'s lines, as the server decides (`server/passwords.py`).

    Only bcrypt lines (`$2a$`, `$2b$`, `$2y$`) are checked; a user whose line has another format
    (`$apr1$`, `{SHA}`, ...) gives False, as do an unknown user and a password `add_user` would refuse.
    A missing file is RESOURCE_DOES_NOT_EXIST.
    """
    try:
        key = _check_name(name)
        secret = _check_password(password)
    except RunyardError:
        return False
    lines = _read(_resolve(path), missing_ok=False) or []
    for i in _find(lines, key):
        stored = _entry(lines[i])[1]  # type: ignore[index]
        if not stored.startswith(_BCRYPT_PREFIXES):
            continue
        try:
            if bcrypt.checkpw(secret, stored):
                return True
        except ValueError:  # a malformed hash
            continue
    return False


def _append(path: str | os.PathLike[str], name: str, key: bytes, hashes: list[bytes]) -> None:
    """Appends a `name:hash` line per hash after the user's last line (the user must exist)."""
    target = _resolve(path)

    def edit(lines: list[bytes]) -> list[bytes]:
        found = _find(lines, key)
        if not found:
            raise _no_user(name, target)
        last = found[-1]
        ending = lines[last][len(lines[last].rstrip(_LINE_ENDINGS)):] or b"\n"
        out = list(lines)
        if not out[last].endswith(b"\n"):
            out[last] += ending
        added = [key + b":" + hashed + ending for hashed in hashes]
        return [*out[:last + 1], *added, *out[last + 1:]]

    _update(target, edit, create=False)


# ----------------------------------------------------------------------------------------------------
# validation


def _check_name(name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise _invalid("user name must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise _invalid(f"user name must be at most {MAX_NAME_CHARS} characters (got {len(name)})")
    if ":" in name:
        raise _invalid("user name must not contain ':' (it separates the name from the hash)")
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in name):
        raise _invalid("user name must not contain whitespace or control characters")
    if name.startswith("#"):
        raise _invalid("user name must not start with '#' (NGINX reads such a line as a comment)")
    return name.encode("utf-8")


def _check_password(password: str) -> bytes:
    # Messages here describe the rule only: never the password, nor any part of it.
    if not isinstance(password, str) or not password:
        raise _invalid("password must not be empty")
    if "\x00" in password:
        raise _invalid("password must not contain a NUL character")
    if "\n" in password or "\r" in password:
        raise _invalid("password must not contain a line break")
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("password is not valid Unicode text") from None  # the exception quotes the text
    if len(secret) > MAX_PASSWORD_BYTES:
        raise _invalid(f"password must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8 (bcrypt's limit; "
                       f"got {len(secret)})")
    return secret


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        return int(group)
    raise _invalid(f"group {group!r} does not exist")


def _invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")


def _no_user(name: str, target: Path) -> RunyardError:
    return RunyardError(f"user {name!r} does not exist in {target}", "RESOURCE_DOES_NOT_EXIST")


# ----------------------------------------------------------------------------------------------------
# file format


def _hash(secret: bytes) -> bytes:
    hashed = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=BCRYPT_ROUNDS, prefix=b"2b"))
    return b"$2y$" + hashed[len(b"$2b$"):]  # same algorithm; `$2y$` is what `htpasswd -B` writes


def _entry(line: bytes) -> tuple[bytes, bytes] | None:
    """(name, hash) of a user line; None for comments, blank lines and lines without a name."""
    if line.startswith(b"#"):
        return None
    name, sep, rest = line.rstrip(_LINE_ENDINGS).partition(b":")
    if not sep or not name:
        return None
    return name, rest


def _find(lines: list[bytes], key: bytes) -> list[int]:
    return [i for i, line in enumerate(lines) if (entry := _entry(line)) is not None and entry[0] == key]


# ----------------------------------------------------------------------------------------------------
# files


def _resolve(path: str | os.PathLike[str]) -> Path:
    # Through symlinks: the rename must replace the real file, not the link, and every caller must lock
    # the same sidecar whichever link it came through.
    return Path(os.path.realpath(os.fspath(path)))


def _read(target: Path, missing_ok: bool) -> list[bytes] | None:
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise RunyardError(f"htpasswd file {target} does not exist", "RESOURCE_DOES_NOT_EXIST") from None
    except OSError as exc:
        raise os_error("cannot read", target, exc) from None
    return data.splitlines(keepends=True)


def _update(target: Path, edit: Callable[[list[bytes]], list[bytes]], create: bool,
            gid: int | None = None) -> None:
    """Read-modify-write of `target` under the sidecar lock, replaced atomically."""
    lock_path = target.with_name(target.name + ".lock")
    try:
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise os_error("cannot create the lock file", lock_path, exc) from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        lines = _read(target, missing_ok=create)
        try:
            current = os.stat(target) if lines is not None else None
        except OSError as exc:
            raise os_error("cannot read", target, exc) from None
        new_lines = edit(lines or [])
        _write_atomically(target, b"".join(new_lines), current, gid)
    finally:
        os.close(lock_fd)  # releases the lock


def _write_atomically(target: Path, data: bytes, current: os.stat_result | None, gid: int | None) -> None:
    try:
        replace_atomically(target, data, prepare=lambda fd: _set_owner_and_mode(fd, target, current, gid))
    except FolderNotWritable as exc:
        raise os_error("cannot write in the directory of", target, exc) from None
    except OSError as exc:
        raise os_error("cannot write", target, exc) from None


def _set_owner_and_mode(fd: int, target: Path, current: os.stat_result | None, gid: int | None) -> None:
    """A new file: 0600, ours. An existing file: its owner, group and mode. `gid` given: that group, 0640.

    Refuses (PERMISSION_DENIED) rather than silently hand the file to another owner or group."""
    uid = current.st_uid if current is not None else os.geteuid()
    group = gid if gid is not None else current.st_gid if current is not None else os.getegid()
    mode = 0o640 if gid is not None else stat.S_IMODE(current.st_mode) if current is not None else 0o600
    if (uid, group) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, uid, group)
        except PermissionError:
            raise RunyardError(f"not allowed to give {target} owner id {uid} and group id {group} "
                               "(run as its owner, in that group, or as root)", "PERMISSION_DENIED") from None
    os.fchmod(fd, mode)
