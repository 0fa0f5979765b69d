"""Artifacts on an FTP server: `ftp://user:password@host:port/path`, or `ftps://…` for explicit TLS
(AUTH TLS, then PROT P so file contents are encrypted too; implicit TLS on port 990 is not supported).

Credentials come from the URI, as in MLflow's FTP store (percent-decoded; no user means anonymous). The
password stays in this module: `description` leaves it out and every error hands it to `store_failure`
as a secret. FTPS verifies the server's certificate and host name against the system CAs (or the file
named by SSL_CERT_FILE).

ftplib blocks and a connection carries one command at a time, so each operation borrows a logged-in
connection from a small pool and runs in worker threads; a transfer keeps its connection and its data
socket for its whole length, one thread hop per MiB. Uploads go to a hidden temporary name next to the
target and are renamed onto it (RNFR/RNTO) once complete: readers see the old file or the whole new one.
"""

from __future__ import annotations

import asyncio
import ftplib
import posixpath
import re
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import unquote, urlsplit

from server.artifacts.base import (
    CHUNK_SIZE,
    ArtifactRepository,
    FileInfo,
    ReadStream,
    rebatch,
    safe_file_path,
    safe_relative_path,
    store_failure,
)
from server.errors import RunyardError, invalid, not_found

# In-flight uploads live next to their target under this prefix; listings hide them.
TMP_PREFIX = ".runyard-upload-"
TIMEOUT_S = 60  # for each blocking socket call, not for a whole transfer
IDLE_CONNECTIONS = 4  # logged-in connections kept between operations
IDLE_CHECK_S = 15  # reuse a connection idle for longer only after a NOOP: servers drop idle sessions

# LIST lines, for servers without MLSD: Unix `ls -l` style, and the DOS style of IIS.
_UNIX_LINE = re.compile(r"^([-dlbcps])\S*\s+\d+\s+\S+\s+(?:\S+\s+)?(\d+)\s+\w{3}\s+\d+\s+[\d:]+\s(.+)$")
_DOS_LINE = re.compile(r"^\d\d-\d\d-\d\d(?:\d\d)?\s+\d\d:\d\d[AP]M\s+(<DIR>|\d+)\s+(.+)$")


def open_repository(uri: str) -> FTPArtifactRepository:
    return FTPArtifactRepository(uri)


class _FTPS(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session: vsftpd (by default)
    and other servers refuse data connections that do not, so nobody can slip into a transfer."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


@dataclass
class _Connection:
    ftp: ftplib.FTP
    mlst: bool  # the server speaks MLST/MLSD (RFC 3659), else LIST/SIZE/CWD
    used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.ftp.close()  # no QUIT: it would wait for a reply, and callers may hold the event loop


class FTPArtifactRepository(ArtifactRepository):
    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.tls = parts.scheme.lower() == "ftps"
        try:
            self.port = parts.port or 21
        except ValueError:
            raise RunyardError("The FTP artifact URI has an invalid port.", "INVALID_STATE") from None
        self.host = parts.hostname or "localhost"
        self.user = unquote(parts.username) if parts.username else "anonymous"
        self.password = unquote(parts.password) if parts.password is not None else ""
        self.root = "/" + unquote(parts.path).strip("/")
        if any(c in value for value in (self.user, self.password, self.root) for c in "\r\n"):
            raise RunyardError("The FTP artifact URI must not contain line breaks.", "INVALID_STATE")
        self.description = f"{'ftps' if self.tls else 'ftp'}://{self.user}@{self.host}:{self.port}{self.root}"
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections -------------------------------------------------------------------------------

    def _failure(self, exc: BaseException, action: str) -> RunyardError:
        # Refusals (5xx, certificate errors) are configuration; dropped sockets and 4xx are worth a retry.
        unreachable = (isinstance(exc, (OSError, EOFError, ftplib.error_temp))
                       and not isinstance(exc, ssl.SSLError))
        reason = f"{action}: {str(exc) or type(exc).__name__}"
        return store_failure(self.description, reason, secrets=(self.password,), unreachable=unreachable)

    def _connect(self) -> _Connection:
        if self.tls:
            ftp = _FTPS(context=ssl.create_default_context(), timeout=TIMEOUT_S, encoding="utf-8")
        else:
            ftp = ftplib.FTP(timeout=TIMEOUT_S, encoding="utf-8")
        try:
            try:
                ftp.connect(self.host, self.port)
            except ftplib.all_errors as exc:
                raise self._failure(exc, "connect") from None
            try:
                ftp.login(self.user, self.password)
                if self.tls:
                    ftp.prot_p()
            except ftplib.all_errors as exc:
                raise self._failure(exc, f"log in as {self.user}") from None
            try:
                features = ftp.sendcmd("FEAT").splitlines()[1:]
            except ftplib.error_perm:
                features = []
            mlst = any(line.strip().upper().startswith("MLST") for line in features)
        except BaseException:
            ftp.close()
            raise
        return _Connection(ftp, mlst)

    def _checkout(self) -> _Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect()
            if time.monotonic() - conn.used < IDLE_CHECK_S:
                return conn
            try:
                conn.ftp.voidcmd("NOOP")
                return conn
            except ftplib.all_errors:
                conn.close()

    def _checkin(self, conn: _Connection) -> None:
        conn.used = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < IDLE_CONNECTIONS:
                self._idle.append(conn)
                return
        conn.close()

    def _call(self, action: str, fn: Callable, *args, keep: bool = False):
        """fn(connection, *args) on a pooled connection, in the calling worker thread. With `keep`, a
        successful fn keeps the connection: what it returns (a transfer) gives it back later."""
        conn = self._checkout()
        try:
            result = fn(conn, *args)
        except (ftplib.error_perm, ftplib.error_temp, RunyardError) as exc:
            self._checkin(conn)  # a complete reply: the connection is still in step
            if isinstance(exc, RunyardError):
                raise
            raise self._failure(exc, action) from None
        except ftplib.all_errors as exc:
            conn.close()
            raise self._failure(exc, action) from None
        except BaseException:
            conn.close()
            raise
        if not keep:
            self._checkin(conn)
        return result

    async def _run(self, action: str, fn: Callable, *args):
        return await asyncio.to_thread(self._call, action, fn, *args)

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- paths -------------------------------------------------------------------------------------

    def _abs(self, relative: str) -> str:
        if "\r" in relative or "\n" in relative:
            raise invalid("Invalid path: FTP cannot name files with line breaks")
        return posixpath.join(self.root, relative) if relative else self.root

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        directory = self._abs(safe_relative_path(path))
        entries = await self._run(f"list {directory}", _entries, directory)
        infos = [FileInfo(name, is_dir, None if is_dir else size)
                 for name, is_dir, size in entries
                 if is_dir is not None and not name.startswith(TMP_PREFIX)]
        return sorted(infos, key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        target = self._abs(relative)
        found = await self._run(f"stat {target}", _stat, target)
        if found is None:
            return None
        is_dir, size = found
        return FileInfo(posixpath.basename(relative), is_dir, None if is_dir else size)

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        target = self._abs(relative)
        action = f"read {target}"
        download = await _owned(partial(self._call, action, self._begin_download, relative, target, offset,
                                        length, keep=True), undo=lambda d: d.close(complete=False))

        async def chunks():
            try:
                while download.position < download.end:
                    try:
                        data = await asyncio.to_thread(download.read)
                    except ftplib.all_errors as exc:
                        raise self._failure(exc, action) from None
                    if not data:
                        raise store_failure(self.description, f"{action}: the transfer ended after "
                                            f"{download.position} of {download.end} bytes")
                    yield data
            finally:
                await _settle(download.close, download.position == download.total)

        async def aclose() -> None:
            await _settle(download.close, False)

        return ReadStream(download.end - download.start, download.total, chunks(), aclose)

    def _begin_download(self, conn: _Connection, relative: str, target: str, offset: int,
                        length: int | None) -> _Download:
        found = _stat(conn, target)
        if found is None:
            raise not_found(f"Artifact '{relative}' does not exist.")
        if found[0]:
            raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        total = found[1] or 0
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))
        sock = None
        if start < end:  # nothing to transfer otherwise: no data connection at all
            conn.ftp.voidcmd("TYPE I")
            sock = conn.ftp.transfercmd(f"RETR {target}", rest=start or None)
        return _Download(self, conn, sock, start, end, total)

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        target = self._abs(relative)
        action = f"write {target}"
        upload = await _owned(self._begin_upload, relative, target, undo=lambda u: u.discard())
        written = 0
        try:
            async for block in rebatch(chunks):
                await self._hop(action, upload.send, block)
                written += len(block)
            await self._hop(action, upload.commit)
        except BaseException:
            # Client gone, server failure or cancellation: the temporary file goes, the old file stays.
            await _settle(upload.discard)
            raise
        return written

    async def _hop(self, action: str, fn: Callable, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except ftplib.all_errors as exc:
            raise self._failure(exc, action) from None

    def _begin_upload(self, relative: str, target: str) -> _Upload:
        conn = self._checkout()
        upload = _Upload(self, conn, target)
        try:
            _make_parents(conn, self.root, relative)
            found = _stat(conn, target)
            if found is not None and found[0]:
                raise invalid(f"Invalid path: '{relative}' is a folder")
            upload.start(posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}"))
        except BaseException as exc:
            upload.discard(reusable=isinstance(exc, (ftplib.error_perm, ftplib.error_temp, RunyardError)))
            if isinstance(exc, ftplib.all_errors):
                raise self._failure(exc, f"write {target}") from None
            raise
        return upload

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        target = self._abs(relative)
        return await self._run(f"delete {target}", _delete, target)


# -- transfers -------------------------------------------------------------------------------------

class _Download:
    """A RETR in progress. Its lock keeps a closing thread from pulling the socket from under a read."""

    def __init__(self, repo: FTPArtifactRepository, conn: _Connection, sock, start: int, end: int,
                 total: int):
        self.repo, self.conn, self.sock = repo, conn, sock
        self.reader = sock.makefile("rb") if sock is not None else None
        self.start, self.end, self.total, self.position = start, end, total, start
        self.lock = threading.Lock()

    def read(self) -> bytes:
        with self.lock:
            if self.reader is None:
                return b""
            data = self.reader.read(min(CHUNK_SIZE, self.end - self.position))  # full size unless at EOF
            self.position += len(data)
            return data

    def close(self, complete: bool) -> None:
        with self.lock:
            conn, self.conn = self.conn, None
            if conn is None:
                return
            if self.sock is None:  # empty range: the connection never left command mode
                self.repo._checkin(conn)
                return
            self.reader.close()
            self.reader = None
            self.sock.close()
            if not complete:
                conn.close()  # an aborted RETR leaves the reply stream in an unknown state
                return
            try:
                conn.ftp.voidresp()  # 226 Transfer complete
            except ftplib.all_errors:
                conn.close()
                return
            self.repo._checkin(conn)


class _Upload:
    """A STOR to a temporary name that becomes the target on commit, or disappears on discard."""

    def __init__(self, repo: FTPArtifactRepository, conn: _Connection, target: str):
        self.repo, self.conn, self.target = repo, conn, target
        self.temporary: str | None = None
        self.sock = None
        self.lock = threading.Lock()

    def start(self, temporary: str) -> None:
        self.conn.ftp.voidcmd("TYPE I")
        self.temporary = temporary  # from here on, discard() removes it
        self.sock = self.conn.ftp.transfercmd(f"STOR {temporary}")

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def _end_transfer(self) -> None:
        sock, self.sock = self.sock, None
        if isinstance(sock, ssl.SSLSocket):
            sock.unwrap()  # a clean TLS close, so the server knows the file is complete
        sock.close()
        self.conn.ftp.voidresp()  # 226: the server has the whole file

    def commit(self) -> None:
        with self.lock:
            self._end_transfer()
            ftp = self.conn.ftp
            try:
                ftp.rename(self.temporary, self.target)
            except ftplib.error_perm:
                found = _stat(self.conn, self.target)
                if found is None or found[0]:
                    if found is not None:
                        raise invalid("Invalid path: the target became a folder during the upload") from None
                    raise
                # Some servers (IIS, some embedded ones) refuse to rename onto an existing file: only
                # there is the replacement not atomic.
                ftp.delete(self.target)
                ftp.rename(self.temporary, self.target)
            self.temporary = None
            conn, self.conn = self.conn, None
            self.repo._checkin(conn)

    def discard(self, reusable: bool = True) -> None:
        """Best effort, never raises: end the transfer, delete the temporary file, free the connection."""
        with self.lock:
            conn, self.conn = self.conn, None
            if conn is None:
                return
            try:
                if self.sock is not None:
                    sock, self.sock = self.sock, None
                    sock.close()  # the server ends the STOR and keeps what it got, deleted next
                    conn.ftp.voidresp()
                if self.temporary is not None:
                    conn.ftp.delete(self.temporary)
                    self.temporary = None
            except ftplib.all_errors:
                reusable = False
            if reusable:
                self.repo._checkin(conn)
                return
            conn.close()
            if self.temporary is not None:  # the connection broke first: once more on a fresh one
                try:
                    self.repo._call("discard", lambda fresh: fresh.ftp.delete(self.temporary))
                except (RunyardError, *ftplib.all_errors):
                    pass


# -- one-connection operations (run in a worker thread) --------------------------------------------

def _stat(conn: _Connection, path: str) -> tuple[bool, int | None] | None:
    """(is_dir, size) of `path`, or None when nothing (or something that is neither) is there."""
    ftp = conn.ftp
    if conn.mlst:
        try:
            reply = ftp.sendcmd(f"MLST {path}")
        except ftplib.error_perm:
            return None
        lines = [line for line in reply.splitlines()[1:] if line.startswith(" ")]
        if not lines:
            return None
        facts = _facts(lines[0].strip().partition(" ")[0])
        if facts.get("type") in ("dir", "cdir", "pdir"):
            return True, None
        if facts.get("type") == "file":
            return False, int(facts.get("size", 0))
        return None
    try:
        ftp.voidcmd("TYPE I")  # SIZE is refused in ASCII mode by many servers
        return False, ftp.size(path)
    except ftplib.error_perm:
        pass
    try:
        ftp.cwd(path)
        return True, None
    except ftplib.error_perm:
        return None


def _facts(text: str) -> dict[str, str]:
    facts = {}
    for fact in text.split(";"):
        key, _, value = fact.partition("=")
        if key:
            facts[key.lower()] = value.lower() if key.lower() == "type" else value
    return facts


def _entries(conn: _Connection, directory: str) -> list[tuple[str, bool | None, int | None]]:
    """(name, is_dir, size) directly under `directory` (None is_dir: a link or special file); [] when
    it is missing or not a directory."""
    ftp = conn.ftp
    entries = []
    if conn.mlst:
        try:
            listing = list(ftp.mlsd(directory))
        except ftplib.error_perm:
            return []
        for name, facts in listing:
            kind = facts.get("type", "").lower()
            if kind in ("cdir", "pdir") or name in (".", ".."):
                continue
            is_dir = True if kind == "dir" else False if kind == "file" else None
            entries.append((name, is_dir, int(facts.get("size", 0)) if kind == "file" else None))
        return entries
    try:
        ftp.cwd(directory)  # LIST <path> would list a file too, and some servers read options in it
    except ftplib.error_perm:
        return []
    lines: list[str] = []
    ftp.retrlines("LIST", lines.append)
    for line in lines:
        if unix := _UNIX_LINE.match(line):
            kind, size, name = unix.groups()
            is_dir = True if kind == "d" else False if kind == "-" else None
            if kind == "l":
                name = name.split(" -> ", 1)[0]
        elif dos := _DOS_LINE.match(line):
            size, name = dos.groups()
            is_dir = size == "<DIR>"
        else:
            continue
        if name not in (".", ".."):
            entries.append((name, is_dir, None if is_dir else int(size)))
    return entries


def _make_parents(conn: _Connection, root: str, relative: str) -> None:
    """Create the folders above `relative` (and the root itself) that are missing."""
    parent = posixpath.dirname(posixpath.join(root, relative))
    found = _stat(conn, parent)
    if found is not None and found[0]:
        return
    parts = [part for part in parent.split("/") if part]
    for depth in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:depth])
        try:
            conn.ftp.mkd(folder)
        except ftplib.error_perm:  # there already, or not ours to create: checked below
            pass
    found = _stat(conn, parent)
    if found is not None and found[0]:
        return
    relative_parts = relative.split("/")[:-1]
    for depth in range(1, len(relative_parts) + 1):
        above = _stat(conn, posixpath.join(root, *relative_parts[:depth]))
        if above is not None and not above[0]:
            raise invalid(f"Invalid path: a parent of '{relative}' is a file, not a folder")
    raise ftplib.error_perm(f"550 cannot create the folder {parent}")


def _delete(conn: _Connection, target: str) -> bool:
    found = _stat(conn, target)
    if found is None:
        return False
    if found[0]:
        _remove_tree(conn, target)
    else:
        conn.ftp.delete(target)
    return True


def _remove_tree(conn: _Connection, directory: str) -> None:
    for name, is_dir, _ in _entries(conn, directory):
        path = posixpath.join(directory, name)
        if is_dir:
            _remove_tree(conn, path)
        else:
            conn.ftp.delete(path)  # files, in-flight temporaries and links alike (never followed)
    conn.ftp.rmd(directory)


# -- cancellation-safe thread hops -----------------------------------------------------------------

async def _owned(fn: Callable, *args, undo: Callable):
    """fn(*args) in a worker thread, returning what it opened. If the caller is cancelled meanwhile, the
    hop still finishes and `undo` releases its result in a thread, so nothing opened is ever orphaned."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def release(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                threading.Thread(target=undo, args=(done.result(),), daemon=True).start()

        future.add_done_callback(release)
        raise


async def _settle(fn: Callable, *args) -> None:
    """A cleanup hop that runs to its end even when the caller is cancelled meanwhile."""
    await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(fn, *args)))
