"""A WebHDFS-protocol test server: a test double, NOT Hadoop (no replication, leases, permissions, quotas,
safe mode or real delegation tokens). It speaks the REST protocol of the Hadoop docs closely enough for
real clients: a "namenode" port for the metadata operations and a "datanode" port that CREATE, APPEND
and OPEN are redirected to (307, with a token the datanode checks), errors as Hadoop's RemoteException
JSON, `user.name` simple auth, or SPNEGO against a real KDC when started with a keytab. Files live in a
local folder; bodies stream through in 1 MiB pieces both ways, so a 1 GB upload keeps memory flat.

Run as its own process (`start()` below does): python webhdfs_server.py --root DIR [--keytab KT]
[--standby] [--users a,b]
prints {"namenode": PORT, "datanode": PORT} on one line once it listens, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

PREFIX = "/webhdfs/v1"
PIECE = 1024 * 1024


class Remote(Exception):
    """An error the server answers with a RemoteException body."""

    def __init__(self, status: int, exception: str, message: str):
        super().__init__(message)
        self.status, self.exception, self.message = status, exception, message


def _status(local: str, name: str) -> dict:
    st = os.stat(local)
    is_dir = os.path.isdir(local)
    return {"pathSuffix": name, "type": "DIRECTORY" if is_dir else "FILE",
            "length": 0 if is_dir else st.st_size,
            "owner": "runyard", "group": "supergroup", "permission": "755" if is_dir else "644",
            "accessTime": int(st.st_atime * 1000), "modificationTime": int(st.st_mtime * 1000),
            "blockSize": 134217728, "replication": 0 if is_dir else 1, "fileId": st.st_ino,
            "childrenNum": len(os.listdir(local)) if is_dir else 0, "storagePolicy": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: WebHdfs

    def log_message(self, *args) -> None:  # quiet: tests read errors from responses
        pass

    # -- plumbing ----------------------------------------------------------------------------------

    def _reply(self, status: int, body: dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        """The request body in pieces of at most PIECE bytes, chunked or not, never all at once."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return
                yield from self._exactly(size)
                self.rfile.readline()
        else:
            yield from self._exactly(int(self.headers.get("Content-Length") or 0))

    def _exactly(self, size: int):
        while size > 0:
            piece = self.rfile.read(min(size, PIECE))
            if not piece:
                raise ConnectionError("client closed the connection mid-body")
            size -= len(piece)
            yield piece

    def _local(self, hdfs_path: str) -> str:
        parts = [part for part in hdfs_path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise Remote(400, "IllegalArgumentException", f"Invalid path name {hdfs_path}")
        return os.path.join(self.server.root, *parts)

    def _negotiate(self) -> dict | None:
        """SPNEGO: the Negotiate header to send back (mutual auth), or None after answering 401/403."""
        header = self.headers.get("Authorization", "")
        if not header.startswith("Negotiate "):
            self._reply(401, {"RemoteException": {"exception": "AuthenticationException",
                                                  "message": "Authentication required"}},
                        {"WWW-Authenticate": "Negotiate"})
            return None
        import gssapi

        context = gssapi.SecurityContext(creds=self.server.acceptor, usage="accept")
        try:
            token = context.step(base64.b64decode(header.split(" ", 1)[1]))
        except (gssapi.exceptions.GSSError, ValueError) as exc:
            self._reply(403, {"RemoteException": {"exception": "AuthenticationException",
                                                  "message": f"GSSException: {exc}"}})
            return None
        if not context.complete:
            self._reply(403, {"RemoteException": {"exception": "AuthenticationException",
                                                  "message": "SPNEGO needs more than one round"}})
            return None
        return {"WWW-Authenticate": f"Negotiate {base64.b64encode(token).decode()}"} if token else {}

    # -- dispatch ----------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        op = query.get("op", "").upper()
        consumed = False
        try:
            if not url.path.startswith(PREFIX):
                raise Remote(404, "FileNotFoundException", f"{url.path} is not a WebHDFS path")
            hdfs_path = "/" + unquote(url.path[len(PREFIX):]).strip("/")
            if self.server.role == "datanode":
                if query.get("delegation") not in self.server.tokens:
                    raise Remote(403, "InvalidToken", "token is missing or was not issued by this namenode")
                consumed = True  # the datanode operations read the body themselves
                return self._datanode(method, op, hdfs_path, query)
            for _ in self._body():  # metadata operations carry no body: drop one if sent
                pass
            consumed = True
            headers = {}
            if self.server.acceptor is not None:
                headers = self._negotiate()
                if headers is None:
                    return
            elif not query.get("user.name"):
                raise Remote(401, "SecurityException", "user.name is required (simple authentication)")
            elif self.server.users and query["user.name"] not in self.server.users:
                raise Remote(403, "AccessControlException", f"Permission denied: user={query['user.name']}")
            if self.server.standby:
                raise Remote(403, "StandbyException", "Operation category READ is not supported in state "
                             "standby")
            status, body, extra = self._namenode(method, op, hdfs_path, query)
            self._reply(status, body, {**headers, **extra})
        except Remote as exc:
            if not consumed:
                self.close_connection = True
            self._reply(exc.status, {"RemoteException": {
                "exception": exc.exception, "message": exc.message,
                "javaClassName": f"org.apache.hadoop.{exc.exception}"}})
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._handle("GET")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- namenode ----------------------------------------------------------------------------------

    def _namenode(self, method: str, op: str, path: str, query: dict) -> tuple[int, dict | None, dict]:
        local = self._local(path)
        with self.server.lock:  # one metadata change at a time, as the namenode's own lock does
            if method == "GET" and op == "GETFILESTATUS":
                return 200, {"FileStatus": _status(self._existing(local, path), "")}, {}
            if method == "GET" and op == "LISTSTATUS":
                self._existing(local, path)
                if not os.path.isdir(local):
                    return 200, {"FileStatuses": {"FileStatus": [_status(local, "")]}}, {}
                entries = [_status(os.path.join(local, n), n) for n in sorted(os.listdir(local))]
                return 200, {"FileStatuses": {"FileStatus": entries}}, {}
            if method == "GET" and op == "GETHOMEDIRECTORY":
                return 200, {"Path": f"/user/{query.get('user.name', 'runyard')}"}, {}
            if method == "PUT" and op == "MKDIRS":
                self._make_dirs(local, path)
                return 200, {"boolean": True}, {}
            if method == "PUT" and op == "RENAME":
                return self._rename(local, path, query)
            if method == "DELETE" and op == "DELETE":
                return 200, {"boolean": self._delete(local, path, query)}, {}
            if method == "PUT" and op == "CREATE":
                if os.path.isdir(local):
                    raise Remote(403, "FileAlreadyExistsException", f"{path} already exists as a directory")
                if os.path.exists(local) and query.get("overwrite", "false").lower() != "true":
                    raise Remote(403, "FileAlreadyExistsException", f"{path} for client already exists")
                self._make_dirs(os.path.dirname(local), os.path.dirname(path))
                return self._redirect(path, query)
            if method == "POST" and op == "APPEND":
                if not os.path.isfile(self._existing(local, path)):
                    raise Remote(403, "FileNotFoundException", f"{path} is not a file")
                return self._redirect(path, query)
            if method == "GET" and op == "OPEN":
                if not os.path.isfile(self._existing(local, path)):
                    raise Remote(404, "FileNotFoundException", f"Path is not a file: {path}")
                return self._redirect(path, query)
        raise Remote(400, "IllegalArgumentException", f"Invalid webhdfs operation: {method} {op}")

    @staticmethod
    def _existing(local: str, path: str) -> str:
        if not os.path.exists(local):  # also false below a file ("NotADirectory")
            raise Remote(404, "FileNotFoundException", f"File does not exist: {path}")
        return local

    def _make_dirs(self, local: str, path: str) -> None:
        probe = self.server.root
        for part in os.path.relpath(local, self.server.root).split(os.sep):
            probe = os.path.join(probe, part) if part != "." else probe
            if os.path.isfile(probe):
                kind = "FileAlreadyExistsException" if probe == local else "ParentNotDirectoryException"
                raise Remote(403, kind, f"Parent path is not a directory: {probe[len(self.server.root):]}")
        os.makedirs(local, exist_ok=True)

    def _rename(self, local: str, path: str, query: dict) -> tuple[int, dict | None, dict]:
        destination = "/" + query.get("destination", "").strip("/")
        target = self._local(destination)
        if "OVERWRITE" in query.get("renameoptions", "").upper():  # rename2: replaces a file atomically
            self._existing(local, path)
            if not os.path.isdir(os.path.dirname(target)):
                raise Remote(404, "FileNotFoundException", f"rename destination parent of {destination} "
                             "not found")
            if os.path.isdir(target) and (not os.path.isdir(local) or os.listdir(target)):
                raise Remote(403, "IOException", f"rename destination {destination} is a directory")
            os.replace(local, target)
            return 200, None, {}
        # the old rename: false rather than errors, and a directory destination receives the source
        if os.path.isdir(target):
            target = os.path.join(target, os.path.basename(local))
        if not os.path.exists(local) or os.path.exists(target) or not os.path.isdir(os.path.dirname(target)):
            return 200, {"boolean": False}, {}
        os.rename(local, target)
        return 200, {"boolean": True}, {}

    def _delete(self, local: str, path: str, query: dict) -> bool:
        if path == "/" or not os.path.exists(local):
            return False
        if os.path.isdir(local):
            if os.listdir(local) and query.get("recursive", "false").lower() != "true":
                raise Remote(403, "PathIsNotEmptyDirectoryException", f"{path} is non empty")
            shutil.rmtree(local)
        else:
            os.remove(local)
        return True

    def _redirect(self, path: str, query: dict) -> tuple[int, None, dict]:
        token = secrets.token_urlsafe(16)
        self.server.tokens.add(token)
        host = (self.headers.get("Host") or "127.0.0.1").rsplit(":", 1)[0]
        params = urlencode({**query, "delegation": token, "namenoderpcaddress": "localhost:8020"})
        location = f"http://{host}:{self.server.datanode_port}{PREFIX}{quote(path)}?{params}"
        return 307, None, {"Location": location}

    # -- datanode ----------------------------------------------------------------------------------

    def _datanode(self, method: str, op: str, path: str, query: dict) -> None:
        local = self._local(path)
        if method in ("PUT", "POST") and op in ("CREATE", "APPEND"):
            mode = "wb" if op == "CREATE" else "ab"
            if op == "CREATE":
                os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, mode) as out:
                for piece in self._body():
                    out.write(piece)
            created = {"Location": f"hdfs://localhost:8020{quote(path)}"} if op == "CREATE" else {}
            return self._reply(201 if op == "CREATE" else 200, None, created)
        if method == "GET" and op == "OPEN":
            if not os.path.isfile(local):
                raise Remote(404, "FileNotFoundException", f"File does not exist: {path}")
            size = os.path.getsize(local)
            offset = int(query.get("offset") or 0)
            if offset > size:
                raise Remote(403, "IOException", f"Offset={offset} out of the range [0, {size})")
            length = size - offset
            if query.get("length"):
                length = min(int(query["length"]), length)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            with open(local, "rb") as source:
                source.seek(offset)
                while length > 0:
                    piece = source.read(min(length, PIECE))
                    if not piece:
                        self.close_connection = True  # truncated meanwhile: the client sees a short body
                        return None
                    self.wfile.write(piece)
                    length -= len(piece)
            return None
        raise Remote(400, "IllegalArgumentException", f"Invalid webhdfs operation: {method} {op}")


class WebHdfs(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, role: str, root: str, shared: dict):
        super().__init__(("127.0.0.1", 0), Handler)
        self.role, self.root = role, root
        self.tokens: set[str] = shared["tokens"]
        self.lock: threading.Lock = shared["lock"]
        self.acceptor = shared["acceptor"]
        self.standby: bool = shared["standby"]
        self.users: set[str] = shared["users"]
        self.datanode_port = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--keytab", help="SPNEGO on the namenode with this keytab (KRB5_CONFIG from the env)")
    parser.add_argument("--standby", action="store_true", help="a standby namenode: refuses every operation")
    parser.add_argument("--users", default="", help="simple auth: the only user.name values let in (a,b)")
    args = parser.parse_args()
    acceptor = None
    if args.keytab:
        import gssapi

        acceptor = gssapi.Credentials(usage="accept", store={"keytab": args.keytab})
    shared = {"tokens": set(), "lock": threading.Lock(), "acceptor": acceptor, "standby": args.standby,
              "users": {user for user in args.users.split(",") if user}}
    os.makedirs(args.root, exist_ok=True)
    namenode, datanode = WebHdfs("namenode", args.root, shared), WebHdfs("datanode", args.root, shared)
    namenode.datanode_port = datanode.server_address[1]
    threading.Thread(target=datanode.serve_forever, daemon=True).start()
    print(json.dumps({"namenode": namenode.server_address[1], "datanode": datanode.server_address[1]}),
          flush=True)
    namenode.serve_forever()


# -- the test side ---------------------------------------------------------------------------------

@dataclass
class WebHdfsServer:
    port: int  # the namenode's WebHDFS HTTP port: what an hdfs://localhost:PORT/ URI names
    datanode_port: int
    root: Path  # the local folder behind "/"
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(root: Path, keytab: Path | None = None, env: dict[str, str] | None = None,
          standby: bool = False, users: tuple[str, ...] = ()) -> WebHdfsServer:
    """Starts the server in a child process (stop it by calling .stop()); `env` adds KRB5_CONFIG etc."""
    root.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--root", str(root)]
    command += ["--keytab", str(keytab)] if keytab else []
    command += ["--standby"] if standby else []
    command += ["--users", ",".join(users)] if users else []
    log = root.parent / f"webhdfs-{root.name}.log"
    # Its own replay cache next to its files, not the machine's /var/tmp.
    child_env = {**os.environ, "KRB5RCACHEDIR": str(root.parent), **(env or {})}
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=child_env)
    line = process.stdout.readline()
    if not line:
        process.wait()
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the WebHDFS test server did not start:\n{tail}")
    ports = json.loads(line)
    return WebHdfsServer(ports["namenode"], ports["datanode"], root, process)


if __name__ == "__main__":
    main()
