"""Artifacts on HDFS through WebHDFS, Hadoop's REST API (the `hdfs` package): no libhdfs, no JVM.

`hdfs://host:port/path`, `hdfs:///path` and `viewfs://cluster/path`. Where the WebHDFS address comes from:

- HADOOP_CONF_DIR set: its core-site.xml and hdfs-site.xml, read as Hadoop does. `hdfs:///path` takes
  fs.defaultFS. A host naming a nameservice (dfs.nameservices) becomes the http addresses of its
  namenodes (dfs.ha.namenodes.<ns>, dfs.namenode.http-address.<ns>.<nn>), tried in turn: one that is
  down or standby is skipped. A host:port that is a namenode's RPC address (dfs.namenode.rpc-address*)
  becomes that namenode's http address. dfs.http.policy=HTTPS_ONLY switches to the https addresses.
  viewfs:// goes through the mount table (fs.viewfs.mounttable.<cluster>.link.<path>, linkFallback).
- otherwise (or when nothing in the files matches): host:port of the URI IS the WebHDFS HTTP address,
  http://host:port (the namenode's dfs.namenode.http-address, 9870 when no port is given), not the RPC
  port 8020 that hdfs:// URIs name inside Hadoop.

Authentication (server.kerberos has the details):
- Kerberos (SPNEGO) when RUNYARD_KERBEROS_KEYTAB (principal from RUNYARD_KERBEROS_PRINCIPAL or
  MLFLOW_KERBEROS_USER) or MLFLOW_KERBEROS_TICKET_CACHE is set, or core-site.xml says
  hadoop.security.authentication=kerberos (then the default ticket cache). A keytab's ticket is renewed
  before it expires.
- otherwise simple auth: user.name = MLFLOW_KERBEROS_USER, else HADOOP_USER_NAME, else the OS user.
MLFLOW_HDFS_DRIVER (libhdfs, libhdfs3) is accepted and ignored: WebHDFS needs no driver.

Writes stream to a temporary file next to the target, then RENAME with renameoptions=OVERWRITE (Hadoop's
rename2, one namenode operation): readers see the old file or the new one, never a part, and a failed
body deletes the temporary. Blocking calls run in worker threads; bodies move in CHUNK_SIZE pieces.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import posixpath
import re
import threading
import uuid
from collections.abc import AsyncIterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
from xml.etree import ElementTree

import requests
from hdfs import Client
from hdfs.util import HdfsError
from requests.adapters import HTTPAdapter

from server.artifacts.base import (
    CHUNK_SIZE,
    ArtifactRepository,
    FileInfo,
    ReadStream,
    safe_file_path,
    safe_relative_path,
    store_failure,
)
from server.errors import RunyardError, invalid, not_found
from server.kerberos import USER_ENV, KerberosError, KerberosSettings, SpnegoAuth, Tickets

log = logging.getLogger("runyard.server")

TMP_PREFIX = ".runyard-upload-"  # in-flight uploads, next to their target; listings hide them
TIMEOUT = (10, 120)  # connect, read (seconds): a dead namenode is skipped quickly, a busy one waited for
_MISSING = ("FileNotFoundException", "ParentNotDirectoryException")  # the latter: a file on the way
_UNREACHABLE = ("StandbyException", "RetriableException", "SafeModeException")
# An upload holds its thread for the whole transfer while it waits for the client's body; on their own
# pool, many slow uploads never starve the short calls (asyncio.to_thread's default pool).
_UPLOADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="runyard-hdfs-upload")
_QUERY = re.compile(r"[?]\S*")
_driver_noted = False


def open_repository(uri: str) -> HdfsArtifactRepository:
    # The hdfs package logs every call at INFO; the server logs one line per request, not three.
    logging.getLogger("hdfs").setLevel(logging.WARNING)
    env = os.environ
    _note_driver(env)
    conf = hadoop_conf(env)
    urls, root = webhdfs_location(uri, conf)
    settings = KerberosSettings.from_env(env)
    if settings is None and conf.get("hadoop.security.authentication", "").lower() == "kerberos":
        settings = KerberosSettings(principal=env.get(USER_ENV) or None)
    user = None if settings else env.get(USER_ENV) or env.get("HADOOP_USER_NAME") or _os_user()
    parts = urlsplit(uri)
    description = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{root}"
    try:
        return HdfsArtifactRepository(urls, root, description, settings, user)
    except KerberosError as exc:  # Kerberos configured, its SDK not installed
        raise RunyardError(f"HDFS artifact store {description}: {exc}", "INVALID_STATE") from None


def _note_driver(env: Mapping[str, str]) -> None:
    global _driver_noted
    driver = env.get("MLFLOW_HDFS_DRIVER")
    if driver and not _driver_noted:
        _driver_noted = True
        shown = driver if driver in ("libhdfs", "libhdfs3") else "(unknown value)"
        log.info("MLFLOW_HDFS_DRIVER=%s is not needed: runyard uses WebHDFS", shown)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # a container user without a passwd entry
        return "runyard"


# -- where WebHDFS is ------------------------------------------------------------------------------

def hadoop_conf(env: Mapping[str, str]) -> dict[str, str]:
    """core-site.xml then hdfs-site.xml from HADOOP_CONF_DIR as one dict ({} when it is not set)."""
    directory = env.get("HADOOP_CONF_DIR")
    conf: dict[str, str] = {}
    for name in ("core-site.xml", "hdfs-site.xml") if directory else ():
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        try:
            properties = ElementTree.parse(path).getroot().iter("property")
        except ElementTree.ParseError as exc:
            raise RunyardError(f"HADOOP_CONF_DIR: {name} is not valid XML: {exc}", "INVALID_STATE") from None
        for prop in properties:
            key = (prop.findtext("name") or "").strip()
            if key:
                conf[key] = (prop.findtext("value") or "").strip()
    return conf


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _host_port(netloc: str) -> tuple[str, int | None]:
    host, _, port = netloc.rpartition("@")[2].rpartition(":")
    if not host or "]" in port:  # no port (or an IPv6 literal without one)
        return netloc.rpartition("@")[2], None
    if not port.isdigit():
        raise RunyardError(f"Invalid port in the HDFS artifact URI: '{port}'", "INVALID_STATE")
    return host, int(port)


def webhdfs_location(uri: str, conf: Mapping[str, str]) -> tuple[list[str], str]:
    """The WebHDFS base URLs to try, in order, and the absolute HDFS path of the store's root."""
    parts = urlsplit(uri)
    path = "/" + parts.path.strip("/")
    if parts.scheme == "viewfs":
        return webhdfs_location(_through_mount_table(parts.netloc, path, conf), conf)
    netloc = parts.netloc
    if not netloc:
        default = urlsplit(conf.get("fs.defaultFS", ""))
        if default.scheme == "viewfs":
            return webhdfs_location(f"viewfs://{default.netloc}{path}", conf)
        if default.scheme != "hdfs" or not default.netloc:
            raise RunyardError("hdfs:///path needs HADOOP_CONF_DIR with an hdfs:// fs.defaultFS in "
                               "core-site.xml; or name the WebHDFS address: hdfs://host:port/path",
                               "INVALID_STATE")
        netloc = default.netloc
    return _namenode_urls(*_host_port(netloc), conf), path


def _namenode_urls(host: str, port: int | None, conf: Mapping[str, str]) -> list[str]:
    https = conf.get("dfs.http.policy", "").upper() == "HTTPS_ONLY"
    scheme, key, default_port = ("https", "dfs.namenode.https-address", 9871) if https else (
        "http", "dfs.namenode.http-address", 9870)
    if port is None and host in _split(conf.get("dfs.nameservices", "")):
        namenodes = _split(conf.get(f"dfs.ha.namenodes.{host}", ""))
        addresses = [conf.get(f"{key}.{host}.{nn}") for nn in namenodes] or [conf.get(f"{key}.{host}")]
        if not all(addresses):
            raise RunyardError(f"HADOOP_CONF_DIR names nameservice '{host}' but not the {key} of each of its "
                               "namenodes", "INVALID_STATE")
        return [f"{scheme}://{address}" for address in addresses]
    rpc = f"{host}:{port or 8020}"
    for name, value in conf.items():  # a namenode's RPC address: use its http address instead
        if name.startswith("dfs.namenode.rpc-address") and value == rpc:
            address = conf.get(key + name[len("dfs.namenode.rpc-address"):])
            if address:
                return [f"{scheme}://{address.replace('0.0.0.0', host)}"]
    return [f"{scheme}://{host}:{port or default_port}"]


def _through_mount_table(cluster: str, path: str, conf: Mapping[str, str]) -> str:
    if not cluster:
        default = urlsplit(conf.get("fs.defaultFS", ""))
        cluster = default.netloc if default.scheme == "viewfs" else ""
    prefix = f"fs.viewfs.mounttable.{cluster}."
    links = {key[len(prefix) + 5:].rstrip("/") or "/": target for key, target in conf.items()
             if key.startswith(prefix + "link.")}
    for link in sorted(links, key=len, reverse=True):  # the longest mount point that holds `path`
        base = link.rstrip("/")
        if path == link or path.startswith(base + "/"):
            return links[link].rstrip("/") + path[len(base):]
    if conf.get(prefix + "linkFallback"):
        return conf[prefix + "linkFallback"].rstrip("/") + path
    raise RunyardError(f"viewfs://{cluster}{path}: no mount point in HADOOP_CONF_DIR "
                       f"({prefix}link.*) holds this path", "INVALID_STATE")


# -- the store -------------------------------------------------------------------------------------

class _Aborted(Exception):
    """The upload body stopped (the client's chunks raised, or the write was cancelled)."""


class _Body:
    """An upload body pulled by the upload thread (inside requests) from the event loop, one batch of
    about CHUNK_SIZE per hop, so the whole body never sits in memory."""

    def __init__(self, chunks: AsyncIterable[bytes], loop: asyncio.AbstractEventLoop):
        self._source = aiter(chunks)
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = None
        self._closed = False
        self.error: BaseException | None = None
        self.written = 0

    async def _batch(self) -> bytes:
        parts, size = [], 0
        while size < CHUNK_SIZE:
            try:
                chunk = await anext(self._source)
            except StopAsyncIteration:
                break
            if chunk:
                parts.append(chunk)
                size += len(chunk)
        return b"".join(parts)

    def blocks(self):
        while True:
            with self._lock:
                if self._closed:
                    raise _Aborted()
                self._pending = asyncio.run_coroutine_threadsafe(self._batch(), self._loop)
            try:
                block = self._pending.result()
            except BaseException as exc:  # noqa: BLE001 - handed back to the writer as it was
                self.error = exc
                # Not an OSError: urllib3 would retry or rewrap it and the caller would lose the cause.
                raise _Aborted() from None
            if not block:
                return
            self.written += len(block)
            yield block

    def close(self) -> None:
        """From the event loop: stop the upload thread at its next block (it then deletes its temporary)."""
        with self._lock:
            self._closed = True
            if self._pending is not None:
                self._pending.cancel()


def _missing(exc: HdfsError) -> bool:
    return getattr(exc, "exception", None) in _MISSING


def _network_reason(exc: requests.RequestException) -> str:
    cause = exc.args[0] if exc.args else exc
    text = str(getattr(cause, "reason", None) or cause)
    # Never a URL's query string: the datanode leg carries a delegation token there.
    return f"{type(exc).__name__}: {_QUERY.sub('', text)}"


class HdfsArtifactRepository(ArtifactRepository):
    def __init__(self, urls: list[str], root: str, description: str, kerberos: KerberosSettings | None = None,
                 user: str | None = None):
        self.root = root
        self.description = description
        self.tickets = Tickets(kerberos) if kerberos else None
        self._secrets = kerberos.secrets if kerberos else ()
        session = requests.Session()
        adapter = HTTPAdapter(pool_maxsize=32)  # threads share the session; keep their connections
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if self.tickets:
            session.auth = SpnegoAuth(self.tickets)
        else:
            session.params = {"user.name": user}
        self._session = session
        # Several URLs (HA): the client tries them in turn and stays on the one that answers.
        self._client = Client(";".join(urls), timeout=TIMEOUT, session=session)

    def _path(self, relative: str) -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def _failure(self, exc: Exception) -> RunyardError:
        unreachable = False
        if isinstance(exc, KerberosError):
            reason, unreachable = str(exc), exc.unreachable
        elif isinstance(exc, requests.RequestException):
            reason, unreachable = _network_reason(exc), True
        elif isinstance(exc, HdfsError) and str(exc).startswith("Authentication failure"):
            reason = ("the namenode refused our Kerberos (SPNEGO) credentials" if self.tickets else
                      "the namenode wants authentication: configure Kerberos (RUNYARD_KERBEROS_KEYTAB or "
                      "MLFLOW_KERBEROS_TICKET_CACHE)")
        elif isinstance(exc, HdfsError):
            kind = getattr(exc, "exception", None) or "error"
            reason, unreachable = f"{kind}: {exc}", kind in _UNREACHABLE
        else:  # an answer that is not WebHDFS JSON
            reason = f"unexpected answer from the WebHDFS address ({type(exc).__name__}: {exc})"
        return store_failure(self.description, reason, self._secrets, unreachable)

    async def _call(self, function, *args):
        try:
            return await asyncio.to_thread(function, *args)
        except (HdfsError, KerberosError, requests.RequestException, KeyError, ValueError) as exc:
            raise self._failure(exc) from None

    def _status(self, relative: str) -> dict | None:
        try:
            return self._client.status(self._path(relative))
        except HdfsError as exc:
            if _missing(exc):
                return None
            raise

    # -- listing and stat --------------------------------------------------------------------------

    async def list_dir(self, path: str) -> list[FileInfo]:
        return await self._call(self._list_dir, safe_relative_path(path))

    def _list_dir(self, relative: str) -> list[FileInfo]:
        try:
            # The raw LISTSTATUS: the client's list() costs a second request and raises for a file.
            statuses = self._client._list_status(self._path(relative)).json()["FileStatuses"]["FileStatus"]
        except HdfsError as exc:
            if _missing(exc):
                return []
            raise
        if len(statuses) == 1 and not statuses[0]["pathSuffix"]:
            return []  # a file lists as itself
        infos = [_info(status["pathSuffix"], status) for status in statuses
                 if not status["pathSuffix"].startswith(TMP_PREFIX)]
        return sorted((info for info in infos if info), key=lambda info: info.name)

    async def stat(self, path: str) -> FileInfo | None:
        relative = safe_relative_path(path)
        status = await self._call(self._status, relative)
        return _info(posixpath.basename(relative), status) if status else None

    # -- read --------------------------------------------------------------------------------------

    async def open_read(self, path: str, offset: int = 0, length: int | None = None) -> ReadStream:
        relative = safe_relative_path(path)
        status = await self._call(self._status, relative)
        if status is None or status["type"] not in ("FILE", "DIRECTORY"):
            raise not_found(f"Artifact '{relative}' does not exist.")
        if status["type"] == "DIRECTORY":
            raise invalid(f"Artifact path refers to a directory, not a file: '{relative}'")
        total = int(status["length"])
        start = min(max(offset, 0), total)
        end = total if length is None else min(total, start + max(length, 0))
        if start >= end:  # HDFS refuses an offset past the end; nothing to fetch anyway
            return ReadStream(0, total, _nothing())
        reader = self._client.read(self._path(relative), offset=start, length=end - start,
                                   chunk_size=CHUNK_SIZE)
        pieces = await self._call(reader.__enter__)  # the OPEN and its redirect: errors surface here
        closed = False

        def close() -> None:  # synchronous, so a cancelled download still releases its connection
            nonlocal closed
            if not closed:
                closed = True
                reader.__exit__(None, None, None)

        async def chunks():
            try:
                while True:
                    piece = await self._call(next, pieces, None)
                    if piece is None:
                        break
                    yield piece
            finally:
                close()

        async def aclose() -> None:
            close()

        return ReadStream(end - start, total, chunks(), aclose)

    # -- write -------------------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterable[bytes]) -> int:
        relative = safe_file_path(path)
        loop = asyncio.get_running_loop()
        body = _Body(chunks, loop)
        upload = loop.run_in_executor(_UPLOADS, self._upload, relative, body)
        try:
            return await upload
        except _Aborted:
            if body.error is None:
                raise
            raise body.error from None  # the client's body failed: its own exception, as other stores
        except (HdfsError, KerberosError, requests.RequestException, KeyError, ValueError) as exc:
            raise self._failure(exc) from None
        except BaseException:
            body.close()  # cancelled: the thread stops at its next block and deletes its temporary
            raise

    def _upload(self, relative: str, body: _Body) -> int:
        target = self._path(relative)
        status = self._status(relative)
        if status and status["type"] == "DIRECTORY":
            raise invalid(f"Invalid path: '{relative}' is a folder")
        temporary = posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            try:
                self._client.write(temporary, data=body.blocks())  # CREATE, 307, body to the datanode
            except HdfsError as exc:
                if exc.exception in ("ParentNotDirectoryException", "FileAlreadyExistsException"):
                    raise invalid(f"Invalid path: a parent of '{relative}' is a file, not a folder") from None
                raise
            try:  # the raw RENAME: the client's rename() knows no overwrite
                self._client._rename(temporary, destination=target, renameoptions="OVERWRITE")
            except HdfsError:
                status = self._status(relative)
                if status and status["type"] == "DIRECTORY":
                    raise invalid("Invalid path: the target became a folder during the upload") from None
                raise
        except BaseException:
            self._discard(temporary)
            raise
        return body.written

    def _discard(self, temporary: str) -> None:
        try:
            self._client.delete(temporary)
        except Exception:  # noqa: BLE001 - already failing: the first error is the one to report
            log.warning("HDFS store %s: could not remove the unfinished upload %s", self.description,
                        temporary)

    # -- delete ------------------------------------------------------------------------------------

    async def delete(self, path: str) -> bool:
        relative = safe_relative_path(path)
        if not relative:
            raise invalid("Invalid path: the artifact root itself cannot be deleted")
        return await self._call(self._delete, relative)

    def _delete(self, relative: str) -> bool:
        try:
            return self._client.delete(self._path(relative), recursive=True)
        except HdfsError as exc:
            if _missing(exc):
                return False
            raise

    def readiness_checks(self):
        return {"kerberos": self._kerberos_ready} if self.tickets else {}

    async def _kerberos_ready(self) -> None:
        """A ticket with lifetime left is held (obtained or renewed now when it runs low)."""
        try:
            await asyncio.to_thread(self.tickets.credentials)
        except KerberosError as exc:
            raise self._failure(exc) from None

    async def aclose(self) -> None:
        self._session.close()
        if self.tickets:
            self.tickets.close()


def _info(name: str, status: Mapping) -> FileInfo | None:
    if status["type"] == "DIRECTORY":
        return FileInfo(name, True)
    if status["type"] == "FILE":
        return FileInfo(name, False, int(status["length"]))
    return None  # a symlink: HDFS has them switched off, and they could lead out of the root


async def _nothing():
    return
    yield  # makes this an (empty) async generator
