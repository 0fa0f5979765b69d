"""Artifacts on an SFTP server (OpenSSH or any other), over paramiko: `sftp://user[:password]@host:port/path`.

Authentication, as in MLflow's SFTP store: ~/.ssh/config may give the host's HostName, Port, User and
IdentityFile. The private key is the file named by RUNYARD_SFTP_KEY_FILE if set, else the config's
IdentityFile, else the default keys (~/.ssh/id_*) and the ssh-agent. A password in the URI is tried for
password authentication and unlocks an encrypted key.

Host keys are pinned: the server's key must already be in known_hosts, ~/.ssh/known_hosts or the file
named by RUNYARD_SFTP_KNOWN_HOSTS. An unknown or changed key is refused (paramiko's RejectPolicy) with a
message naming the host, its key fingerprint and how to add it; never accepted silently.

Uploads go to a hidden temporary name next to the target, then posix-rename (the OpenSSH extension every
common server has) puts them in place atomically. Blocking calls run in worker threads, one hop per MiB.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import os
import posixpath
import socket
import stat
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterable, Callable
from urllib.parse import unquote, urlsplit

import paramiko
from paramiko.sftp import CMD_DATA, CMD_READ, CMD_STATUS, int64

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

KEY_FILE_ENV = "RUNYARD_SFTP_KEY_FILE"
KNOWN_HOSTS_ENV = "RUNYARD_SFTP_KNOWN_HOSTS"
# In-flight uploads live next to their target under this prefix; listings hide them.
TMP_PREFIX = ".runyard-upload-"
TIMEOUT_S = 30
# Sessions (channels) open at once on the one SSH connection: below OpenSSH's default MaxSessions (10).
MAX_SESSIONS = 8
BUSY_WAIT_S = 0.02  # how often an operation waiting for a free session looks again
WINDOW_BYTES = 16 * 2**20  # per session: above the bytes in flight, so replies never wait for window
READ_REQUEST = 32768  # paramiko's largest SFTP read request (SFTPFile.MAX_REQUEST_SIZE)
READ_DEPTH = 128  # read requests in flight per download (4 MiB), so latency does not bound throughput
_BUSY = object()


def open_repository(uri: str) -> SFTPArtifactRepository:
    return SFTPArtifactRepository(uri)


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, host: str, key: paramiko.PKey):
        super().__init__(f"{host} not found in known_hosts")
        self.host, self.key = host, key


class _RefuseUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy, with the offered key kept so the error can show its fingerprint."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(hostname, key)


def _ssh_config(host: str) -> dict:
    path = os.path.expanduser("~/.ssh/config")
    if not os.path.exists(path):
        return {}
    return paramiko.SSHConfig.from_path(path).lookup(host)


class SFTPArtifactRepository(ArtifactRepository):
    """One SSH connection per repository, opened on first use and reopened if it drops: authenticating
    once is what costs (a key exchange and a signature), and paramiko's Transport multiplexes channels
    safely. Each operation runs on its own SFTP session (a channel) from a small pool, because one
    SFTPClient matches replies to requests with a single reader: two threads must never share it."""

    def __init__(self, uri: str):
        parts = urlsplit(uri)
        alias = parts.hostname or "localhost"
        config = _ssh_config(alias)
        self.host = config.get("hostname", alias)
        try:
            self.port = parts.port or int(config.get("port", 22))
        except ValueError:
            raise RunyardError("The SFTP artifact URI has an invalid port.", "INVALID_STATE") from None
        self.user = unquote(parts.username) if parts.username else config.get("user") or getpass.getuser()
        self.password = unquote(parts.password) if parts.password is not None else None
        self.root = "/" + unquote(parts.path).strip("/")
        key_file = os.environ.get(KEY_FILE_ENV) or (config.get("identityfile") or [None])[0]
        self.key_file = os.path.expanduser(key_file) if key_file else None
        self.known_hosts = os.path.expanduser(os.environ.get(KNOWN_HOSTS_ENV) or "~/.ssh/known_hosts")
        self.description = f"sftp://{self.user}@{self.host}:{self.port}{self.root}"
        self._lock = threading.Lock()
        self._ssh: paramiko.SSHClient | None = None
        self._idle: list[paramiko.SFTPClient] = []
        self._busy = 0  # sessions handed out; with the idle ones never above MAX_SESSIONS

    # -- connection and sessions -------------------------------------------------------------------

    def _failure(self, exc: BaseException, action: str) -> RunyardError:
        secrets = (self.password,)
        where = f"{self.host}:{self.port}"
        if isinstance(exc, _UnknownHostKey):
            missing = "" if os.path.exists(self.known_hosts) else " (no such file)"
            reason = (f"the host key of {where} ({exc.key.get_name()} {exc.key.fingerprint}) is not in "
                      f"{self.known_hosts}{missing}, so the connection was refused. Check the fingerprint "
                      f"with the server's administrator, then add the key there (e.g. `ssh-keyscan -p "
                      f"{self.port} {self.host}`) or point {KNOWN_HOSTS_ENV} at a file that has it")
            return store_failure(self.description, reason, secrets)
        if isinstance(exc, paramiko.BadHostKeyException):
            reason = (f"the host key of {where} ({exc.key.get_name()} {exc.key.fingerprint}) differs from "
                      f"the one in {self.known_hosts}: the server's key changed or someone is intercepting "
                      "the connection, so it was refused. Update known_hosts only once you trust the new key")
            return store_failure(self.description, reason, secrets)
        if isinstance(exc, paramiko.AuthenticationException):
            reason = (f"authentication as {self.user} failed ({exc}): the private key ({KEY_FILE_ENV}, the "
                      "IdentityFile of ~/.ssh/config or the default keys) or the URI's password is not "
                      "accepted by the server")
            return store_failure(self.description, reason, secrets)
        unreachable = isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, EOFError,
                                       paramiko.ssh_exception.NoValidConnectionsError, paramiko.SSHException))
        return store_failure(self.description, f"{action}: {str(exc) or type(exc).__name__}", secrets,
                             unreachable)

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if os.path.exists(self.known_hosts):
            client.get_host_keys().load(self.known_hosts)
        client.set_missing_host_key_policy(_RefuseUnknownHost())
        explicit_key = self.key_file is not None  # then only that key: no surprise from an agent
        try:
            client.connect(self.host, self.port, username=self.user, password=self.password,
                           key_filename=self.key_file, look_for_keys=not explicit_key,
                           allow_agent=not explicit_key, timeout=TIMEOUT_S, banner_timeout=TIMEOUT_S,
                           auth_timeout=TIMEOUT_S)
        except BaseException:
            client.close()
            raise
        return client

    def _checkout(self) -> paramiko.SFTPClient | None:
        """A session of the SSH connection (connecting first if needed); None while all are in use."""
        with self._lock:
            if self._busy >= MAX_SESSIONS:
                return None
            transport = self._ssh.get_transport() if self._ssh is not None else None
            if transport is None or not transport.is_active():
                self._drop_connection()
                self._ssh = self._connect()
                transport = self._ssh.get_transport()
            session = self._idle.pop() if self._idle else None
            if session is None or session.sock.closed:
                session = paramiko.SFTPClient.from_transport(transport, window_size=WINDOW_BYTES)
            self._busy += 1
            return session

    def _checkin(self, session: paramiko.SFTPClient, healthy: bool = True) -> None:
        with self._lock:
            self._busy -= 1
            current = self._ssh.get_transport() if self._ssh is not None else None
            if healthy and not session.sock.closed and session.sock.get_transport() is current:
                self._idle.append(session)
                return
        session.close()

    def _drop_connection(self) -> None:
        idle, self._idle = self._idle, []
        for session in idle:
            session.close()
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def _in_session(self, action: str, fn: Callable, args: tuple, keep: bool = False):
        """fn(session, *args) on a pooled session, in the calling worker thread; _BUSY if none is free.
        Checkout and checkin share one hop, so a cancelled caller can never orphan a session. With
        `keep`, a successful fn keeps the session: what it returns (a transfer) checks it in later."""
        try:
            session = self._checkout()
            if session is None:
                return _BUSY
            healthy = kept = False
            try:
                result = fn(session, *args)
                healthy, kept = True, keep
                return result
            except RunyardError:
                healthy = True  # a complete reply that meant "no": the session is fine
                raise
            finally:
                if not kept:
                    self._checkin(session, healthy)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure(exc, action) from None

    async def _run(self, action: str, fn: Callable, *args):
        while (result := await asyncio.to_thread(self._in_session, action, fn, args)) is _BUSY:
            await asyncio.sleep(BUSY_WAIT_S)
        return result

    async def _open(self, action: str, fn: Callable, *args):
        """Like _run, for a transfer that keeps its session after this hop (fn returns its holder)."""
        while (result := await _owned(self._in_session, action, fn, args, True, undo=_discard)) is _BUSY:
            await asyncio.sleep(BUSY_WAIT_S)
        return result

    async def _hop(self, action: str, fn: Callable, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._failure(exc, action) from None

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                self._drop_connection()

        await asyncio.to_thread(close)

    # -- paths -------------------------------------------------------------------------------------

    def _abs(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        directory = self._abs(safe_relative_path(path))
        return await self._run(f"list {directory}", _list_dir, directory)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        target = self._abs(relative)
        attrs = await self._run(f"stat {target}", _stat, target)
        return _info(posixpath.basename(relative), attrs) if attrs is not None else None

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        target = self._abs(relative)
        action = f"read {target}"
        download = await self._open(action, self._begin_download, relative, target, offset, length)

        async def chunks():
            try:
                while download.position < download.end:
                    data = await self._hop(action, download.read)
                    if not data:
                        raise store_failure(self.description, f"{action}: the file ended after "
                                            f"{download.position} of {download.end} bytes")
                    yield data
            finally:
                await _settle(download.close)

        async def aclose() -> None:
            await _settle(download.close)

        return ReadStream(download.end - download.start, download.total, chunks(), aclose)

    def _begin_download(self, session: paramiko.SFTPClient, relative: str, target: str, offset: int,
                        length: int | None) -> _Download:
        try:
            file = session.open(target, "rb")
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise not_found(f"Artifact '{relative}' does not exist.") from None
            raise
        attrs = file.stat()  # of the open file: the size cannot change under us (writers rename)
        if not stat.S_ISREG(attrs.st_mode or 0):
            file.close()
            if stat.S_ISDIR(attrs.st_mode or 0):
                raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
            raise not_found(f"Artifact '{relative}' does not exist.")
        total = attrs.st_size or 0
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))
        return _Download(self, session, file, start, end, total)

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        target = self._abs(relative)
        action = f"write {target}"
        upload = await self._open(action, self._begin_upload, relative, target)
        written = 0
        try:
            async for block in rebatch(chunks):
                await self._hop(action, upload.send, block)
                written += len(block)
            await self._hop(action, upload.commit, written)
        except BaseException:
            # Client gone, server failure or cancellation: the temporary file goes, the old file stays.
            await _settle(upload.discard)
            raise
        return written

    def _begin_upload(self, session: paramiko.SFTPClient, relative: str, target: str) -> _Upload:
        _make_parents(session, self.root, relative)
        attrs = _stat(session, target)
        if attrs is not None and stat.S_ISDIR(attrs.st_mode or 0):
            raise invalid(f"Invalid path: '{relative}' is a folder")
        temporary = posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")
        file = session.open(temporary, "wxb")  # x: exclusive, never someone else's file
        file.set_pipelined(True)  # don't wait for each write's acknowledgement
        return _Upload(self, session, file, temporary, target)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        target = self._abs(relative)
        return await self._run(f"delete {target}", _delete, target)


# -- transfers -------------------------------------------------------------------------------------

class _Download:
    """An open remote file being read, with up to READ_DEPTH read requests in flight: waiting for each
    reply in turn would make every 32 KiB a round trip (paramiko's readv/prefetch do pipeline, but scan
    their buffers per reply and, for prefetch, buffer unread data without bound). The lock keeps a
    closing thread from racing a read hop."""

    def __init__(self, repo: SFTPArtifactRepository, session: paramiko.SFTPClient, file, start: int,
                 end: int, total: int):
        self.repo, self.session, self.file = repo, session, file
        self.start, self.end, self.total, self.position = start, end, total, start
        self.requested = start  # the next offset to ask for
        self.pending: deque[tuple[int, int, int]] = deque()  # (request number, offset, length)
        self.early: dict[int, tuple[int, paramiko.Message]] = {}  # replies that overtook an older one
        self.lock = threading.Lock()

    def _async_response(self, kind: int, message: paramiko.Message, number: int) -> None:
        # paramiko hands this object a reply to one of our requests that came while it awaited another.
        self.early[number] = (kind, message)

    def _ask(self, offset: int, length: int, urgent: bool = False) -> None:
        number = self.session._async_request(self, CMD_READ, self.file.handle, int64(offset), int(length))
        (self.pending.appendleft if urgent else self.pending.append)((number, offset, length))

    def _reply(self, number: int) -> bytes | None:
        """The data of request `number`; None at the end of the file. Raises on a failed read."""
        try:
            if number in self.early:
                kind, message = self.early.pop(number)
                if kind == CMD_STATUS:
                    self.session._convert_status(message)
            else:
                kind, message = self.session._read_response(number)
        except EOFError:  # the SFTP "end of file" status (a dropped connection raises SSHException)
            return None
        if kind != CMD_DATA:
            raise paramiko.SFTPError("Expected data")
        return message.get_string()

    def read(self) -> bytes:
        """Up to CHUNK_SIZE bytes from the current position; fewer only at the end of the file."""
        with self.lock:
            if self.file is None:
                return b""
            size = min(CHUNK_SIZE, self.end - self.position)
            out = bytearray()
            while len(out) < size:
                while len(self.pending) < READ_DEPTH and self.requested < self.end:
                    length = min(READ_REQUEST, self.end - self.requested)
                    self._ask(self.requested, length)
                    self.requested += length
                if not self.pending:
                    break
                number, offset, length = self.pending.popleft()
                data = self._reply(number)
                if data is None:
                    self.requested = self.end  # shorter than its size said: ask for nothing more
                    break
                if len(data) < length:  # a server may answer with less: ask for the rest first
                    self._ask(offset + len(data), length - len(data), urgent=True)
                out += data
            self.position += len(out)
            return bytes(out)

    def close(self) -> None:
        with self.lock:
            file, self.file = self.file, None
            if file is None:
                return
            healthy = True
            try:
                while self.pending:  # read the replies still due, so the session is clean for reuse
                    number = self.pending.popleft()[0]
                    if number not in self.early:
                        self._reply(number)
                file.close()
            except (OSError, EOFError, paramiko.SSHException):
                healthy = False
            self.repo._checkin(self.session, healthy)


class _Upload:
    """A temporary remote file that becomes the target on commit, or disappears on discard."""

    def __init__(self, repo: SFTPArtifactRepository, session: paramiko.SFTPClient, file, temporary: str,
                 target: str):
        self.repo, self.session, self.file = repo, session, file
        self.temporary: str | None = temporary
        self.target = target
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.file.write(data)

    def commit(self, written: int) -> None:
        with self.lock:
            file, self.file = self.file, None
            # paramiko drops the replies of pipelined writes still unread at close, errors included
            # (a full disk, a quota): read them first, so such an error fails the upload.
            while file._reqs:
                file.sftp._read_response(file._reqs.popleft())
            file.close()
            size = self.session.stat(self.temporary).st_size
            if size != written:
                raise OSError(f"the server stored {size} of {written} bytes")
            try:
                self.session.posix_rename(self.temporary, self.target)
            except OSError:
                attrs = _stat(self.session, self.target)
                if attrs is not None and stat.S_ISDIR(attrs.st_mode or 0):
                    raise invalid("Invalid path: the target became a folder during the upload") from None
                raise
            self.temporary = None
            session, self.session = self.session, None
            self.repo._checkin(session)

    def discard(self) -> None:
        """Best effort, never raises: close and delete the temporary file, free the session."""
        with self.lock:
            session, self.session = self.session, None
            if session is None:
                return
            healthy = True
            try:
                if self.file is not None:
                    file, self.file = self.file, None
                    file.close()
                if self.temporary is not None:
                    session.remove(self.temporary)
            except (OSError, EOFError, paramiko.SSHException):
                healthy = False
            self.repo._checkin(session, healthy)


def _discard(transfer: _Download | _Upload) -> None:
    (transfer.close if isinstance(transfer, _Download) else transfer.discard)()


# -- one-session operations (run in a worker thread) -----------------------------------------------

def _stat(session: paramiko.SFTPClient, path: str) -> paramiko.SFTPAttributes | None:
    try:
        return session.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # also what OpenSSH answers for ENOTDIR
            return None
        raise


def _info(name: str, attrs: paramiko.SFTPAttributes) -> FileInfo | None:
    mode = attrs.st_mode or 0
    if stat.S_ISDIR(mode):
        return FileInfo(name, True)
    if stat.S_ISREG(mode):
        return FileInfo(name, False, attrs.st_size or 0)
    return None  # sockets, fifos, devices are not artifacts


def _list_dir(session: paramiko.SFTPClient, directory: str) -> list[FileInfo]:
    try:
        entries = session.listdir_attr(directory)
    except OSError as exc:
        attrs = _stat(session, directory) if exc.errno != errno.ENOENT else None
        if attrs is None or not stat.S_ISDIR(attrs.st_mode or 0):
            return []  # missing, or a file
        raise
    infos = []
    for entry in entries:
        if entry.filename.startswith(TMP_PREFIX) or entry.filename in (".", ".."):
            continue
        attrs = entry
        if stat.S_ISLNK(entry.st_mode or 0):  # listings report links themselves: show what they lead to
            attrs = _stat(session, posixpath.join(directory, entry.filename))
        info = _info(entry.filename, attrs) if attrs is not None else None
        if info is not None:
            infos.append(info)
    return sorted(infos, key=lambda info: info.name)


def _make_parents(session: paramiko.SFTPClient, root: str, relative: str) -> None:
    """Create the folders above `relative` (and the root itself) that are missing."""
    parent = posixpath.dirname(posixpath.join(root, relative))
    attrs = _stat(session, parent)
    if attrs is not None and stat.S_ISDIR(attrs.st_mode or 0):
        return
    parts = [part for part in parent.split("/") if part]
    inside_from = len([part for part in root.split("/") if part])  # first depth below the root
    for depth in range(1, len(parts) + 1):
        folder = "/" + "/".join(parts[:depth])
        attrs = _stat(session, folder)
        if attrs is None:
            try:
                session.mkdir(folder)
                continue
            except OSError:  # a concurrent upload may have made it meanwhile
                attrs = _stat(session, folder)
                if attrs is None:
                    raise
        if not stat.S_ISDIR(attrs.st_mode or 0):
            if depth > inside_from:
                raise invalid(f"Invalid path: a parent of '{relative}' is a file, not a folder")
            raise OSError(f"{folder} is a file, not a folder")


def _delete(session: paramiko.SFTPClient, target: str) -> bool:
    try:
        attrs = session.lstat(target)  # a link is removed, never followed
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    if stat.S_ISDIR(attrs.st_mode or 0):
        _remove_tree(session, target)
    else:
        session.remove(target)
    return True


def _remove_tree(session: paramiko.SFTPClient, directory: str) -> None:
    for entry in session.listdir_attr(directory):  # lstat attributes: links are not followed
        if entry.filename in (".", ".."):
            continue
        path = posixpath.join(directory, entry.filename)
        if stat.S_ISDIR(entry.st_mode or 0):
            _remove_tree(session, path)
        else:
            session.remove(path)
    session.rmdir(directory)


# -- cancellation-safe thread hops -----------------------------------------------------------------

async def _owned(fn: Callable, *args, undo: Callable):
    """fn(*args) in a worker thread, returning what it opened. If the caller is cancelled meanwhile, the
    hop still finishes and `undo` releases its result in a thread, so nothing opened is ever orphaned."""
    future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def release(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None and done.result() is not _BUSY:
                threading.Thread(target=undo, args=(done.result(),), daemon=True).start()

        future.add_done_callback(release)
        raise


async def _settle(fn: Callable, *args) -> None:
    """A cleanup hop that runs to its end even when the caller is cancelled meanwhile."""
    await asyncio.shield(asyncio.ensure_future(asyncio.to_thread(fn, *args)))
