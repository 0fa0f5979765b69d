"""A recorded-API test double of the Kubernetes API server, for the Secrets a `k8s://` reference names.

No API server can run here (design.md, "Test doubles"): this one answers just
GET/POST/PATCH /api/v1/namespaces/{ns}/secrets[/{name}] over HTTP on 127.0.0.1, with the API server's JSON
shapes (v1 Secret objects with base64 `data`, v1 Status objects for errors), checks a bearer token, applies
`application/merge-patch+json` and `application/strategic-merge-patch+json` bodies, and records every
request (method, path, content type, body) for the tests to inspect.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?$")
_MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str | None
    body: dict | None


@dataclass
class FakeKubernetes:
    token: str
    namespaces: set[str] = field(default_factory=lambda: {"default"})
    forbidden: set[str] = field(default_factory=set)  # namespaces the token may not touch (403)
    secrets: dict[tuple[str, str], dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: int = 0

    # -- what the tests use

    def data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's keys, decoded; None when it does not exist."""
        secret = self.secrets.get((namespace, name))
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def put(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.namespaces.add(namespace)
        self.secrets[(namespace, name)] = self._object(
            namespace, name, {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}, "Opaque")

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "runyard", "user": {"token": token or self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "runyard"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # -- the API

    def _object(self, namespace: str, name: str, data: dict, kind_type: str) -> dict:
        self._version += 1
        return {"apiVersion": "v1", "kind": "Secret", "type": kind_type,
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                             "resourceVersion": str(self._version),
                             "creationTimestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
                "data": data}

    def handle(self, method: str, path: str, headers, body: dict | None) -> tuple[int, dict]:
        self.requests.append(Recorded(method, path, headers.get("Content-Type"), body))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        match = _PATH.match(path.split("?", 1)[0])
        if not match:
            return _status(404, "NotFound", "the server could not find the requested resource")
        namespace, name = match.groups()
        verb = {"GET": "get", "POST": "create", "PATCH": "patch"}[method]
        if namespace in self.forbidden:
            what = f'secrets "{name}"' if name else "secrets"
            return _status(403, "Forbidden",
                           f'{what} is forbidden: User "system:serviceaccount:ci:runyard" cannot {verb} '
                           f'resource "secrets" in API group "" in the namespace "{namespace}"',
                           name=name)
        with self._lock:
            if method == "POST" and name is None:
                return self._create(namespace, body or {})
            if name is None:
                return _status(405, "MethodNotAllowed", "the server does not allow this method")
            current = self.secrets.get((namespace, name))
            if current is None:
                return _status(404, "NotFound", f'secrets "{name}" not found', name=name)
            if method == "GET":
                return 200, copy.deepcopy(current)
            if method == "PATCH":
                content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
                if content_type not in _MERGE_TYPES:
                    return _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown "
                                   f"format - accepted media types include: {', '.join(_MERGE_TYPES)}")
                patched = _merge(copy.deepcopy(current), body or {})
                error = _check_data(patched.get("data"))
                if error:
                    return _status(422, "Invalid", f'Secret "{name}" is invalid: {error}', name=name)
                self._version += 1
                patched["metadata"]["resourceVersion"] = str(self._version)
                self.secrets[(namespace, name)] = patched
                return 200, copy.deepcopy(patched)
        return _status(405, "MethodNotAllowed", "the server does not allow this method")

    def _create(self, namespace: str, body: dict) -> tuple[int, dict]:
        name = (body.get("metadata") or {}).get("name")
        if namespace not in self.namespaces:
            return _status(404, "NotFound", f'namespaces "{namespace}" not found', name=namespace,
                           kind="namespaces")
        if body.get("kind") not in (None, "Secret") or not name:
            return _status(400, "BadRequest", "the body is not a named v1 Secret")
        if (namespace, name) in self.secrets:
            return _status(409, "AlreadyExists", f'secrets "{name}" already exists', name=name)
        error = _check_data(body.get("data"))
        if error:
            return _status(422, "Invalid", f'Secret "{name}" is invalid: {error}', name=name)
        created = self._object(namespace, name, dict(body.get("data") or {}), body.get("type") or "Opaque")
        created["metadata"].update({k: v for k, v in body["metadata"].items() if k in ("labels",)})
        self.secrets[(namespace, name)] = created
        return 201, copy.deepcopy(created)


def _merge(target, patch):
    """RFC 7386 JSON merge patch (for a Secret's plain maps strategic merge does the same)."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def _check_data(data) -> str | None:
    for key, value in (data or {}).items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            return f"data[{key}]: Invalid value: not base64"
    return None


def _status(code: int, reason: str, message: str, name: str | None = None,
            kind: str = "secrets") -> tuple[int, dict]:
    status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": message, "reason": reason, "code": code}
    if name:
        status["details"] = {"name": name, "kind": kind}
    return code, status


@contextmanager
def fake_kubernetes(token: str = "test-bearer-token"):
    api = FakeKubernetes(token)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                code, answer = _status(400, "BadRequest", "the body is not JSON")
            else:
                code, answer = api.handle(self.command, self.path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _answer

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
