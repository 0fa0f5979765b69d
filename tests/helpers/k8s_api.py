"""A recorded-API test double of the Kubernetes API server (design.md, "Test doubles": no API server can run
here).

An HTTP server on 127.0.0.1 keeps objects in memory and answers the REST API the way kube-apiserver does for
the resources runyard touches: core v1 namespaces, secrets, configmaps, services, serviceaccounts,
persistentvolumeclaims and pods (+ pods/{name}/log), apps/v1 deployments, batch/v1 jobs, policy/v1
poddisruptionbudgets, autoscaling/v2 horizontalpodautoscalers, networking.k8s.io/v1 networkpolicies and
ingresses, and the service proxy. Verbs: GET (one, or a list filtered by labelSelector), POST, PATCH
(server-side apply with application/apply-patch+yaml and a required fieldManager; JSON merge and strategic
merge patches), DELETE (propagationPolicy, garbage collection through ownerReferences). Objects carry uid,
resourceVersion, creationTimestamp and generation (bumped when spec changes); errors are v1 Status objects
with the API server's codes and messages (401 without the bearer token, 403 in a forbidden namespace, 404,
409, 415, 422). Every request is recorded in order.

What the cluster's controllers would do on their own (Jobs finishing, Deployments rolling out, pods and
their logs, what answers behind a Service) is scripted in helpers/k8s_cluster.py.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

from helpers import k8s_cluster
from helpers.k8s_cluster import Script, now, status

# (group/version, plural) -> (kind, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "namespaces"): ("Namespace", False),
    ("v1", "secrets"): ("Secret", True),
    ("v1", "configmaps"): ("ConfigMap", True),
    ("v1", "services"): ("Service", True),
    ("v1", "serviceaccounts"): ("ServiceAccount", True),
    ("v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("v1", "pods"): ("Pod", True),
    ("apps/v1", "deployments"): ("Deployment", True),
    ("batch/v1", "jobs"): ("Job", True),
    ("policy/v1", "poddisruptionbudgets"): ("PodDisruptionBudget", True),
    ("autoscaling/v2", "horizontalpodautoscalers"): ("HorizontalPodAutoscaler", True),
    ("networking.k8s.io/v1", "networkpolicies"): ("NetworkPolicy", True),
    ("networking.k8s.io/v1", "ingresses"): ("Ingress", True),
}
# Resources whose status only the status subresource (a controller) writes: a client's status is dropped.
_STATUS_SUBRESOURCE = {"namespaces", "services", "persistentvolumeclaims", "pods", "deployments", "jobs",
                       "poddisruptionbudgets", "horizontalpodautoscalers", "ingresses"}
_GENERATION = {"deployments", "jobs", "poddisruptionbudgets", "horizontalpodautoscalers", "networkpolicies",
               "ingresses"}
_APPLY = "application/apply-patch+yaml"
_MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    query: dict[str, str]
    content_type: str | None
    body: object


@dataclass(frozen=True)
class Route:
    group_version: str
    plural: str
    namespace: str | None
    name: str | None
    sub: str | None  # "status", "log", "proxy/ready", ...

    @property
    def resource(self) -> str:  # as the API server names it in messages: deployments.apps, secrets
        group = self.group_version.rpartition("/")[0]
        return f"{self.plural}.{group}" if group else self.plural


@dataclass
class FakeKubernetes:
    token: str
    namespaces: set[str] = field(default_factory=lambda: {"default"})
    forbidden: set[str] = field(default_factory=set)  # namespaces the token may not touch (403)
    objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = field(
        default_factory=lambda: {key: {} for key in RESOURCES})  # (gv, plural) -> (namespace, name) -> object
    logs: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, pod) -> its log
    script: Script = field(default_factory=Script)
    pending: dict[str, list] = field(default_factory=dict)  # uid -> what a controller has yet to do
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _version: int = 0

    # ---- what the tests use -----------------------------------------------------------------------

    @property
    def secrets(self) -> dict[tuple[str, str], dict]:
        return self.objects[("v1", "secrets")]

    def get(self, group_version: str, plural: str, namespace: str, name: str) -> dict | None:
        found = self.objects[(group_version, plural)].get((namespace, name))
        return copy.deepcopy(found)

    def data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's keys, decoded; None when it does not exist."""
        secret = self.secrets.get((namespace, name))
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def put(self, namespace: str, name: str, data: dict[str, str], kind_type: str = "Opaque") -> None:
        """A Secret created by its operator (not by runyard)."""
        self.namespaces.add(namespace)
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.store(Route("v1", "secrets", namespace, name, None),
                   {"apiVersion": "v1", "kind": "Secret", "type": kind_type, "data": encoded})

    def put_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.namespaces.add(namespace)
        self.store(Route("v1", "configmaps", namespace, name, None),
                   {"apiVersion": "v1", "kind": "ConfigMap", "data": dict(data)})

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method not in ("GET", "HEAD")]

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "runyard", "user": {"token": token or self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "runyard"}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # ---- storage (also used by k8s_cluster, under the lock) ----------------------------------------

    def store(self, route: Route, body: dict) -> dict:
        """A new object from `body`, with the fields the API server sets on create."""
        self._version += 1
        metadata = copy.deepcopy(body.get("metadata") or {})
        metadata.update({"name": route.name, "uid": str(uuid.uuid4()), "resourceVersion": str(self._version),
                         "creationTimestamp": now()})
        if route.namespace:
            metadata["namespace"] = route.namespace
        created = {k: copy.deepcopy(v) for k, v in body.items() if k != "metadata"}
        created["metadata"] = metadata
        if route.plural in _STATUS_SUBRESOURCE:
            created.pop("status", None)
        if route.plural in _GENERATION:
            metadata["generation"] = 1
        k8s_cluster.admit(self, route, created)
        self._objects(route)[(route.namespace or "", route.name)] = created
        k8s_cluster.written(self, route, created, None)
        return created

    def create_object(self, group_version: str, plural: str, namespace: str | None, name: str,
                      body: dict) -> dict:
        return self.store(Route(group_version, plural, namespace, name, None), body)

    def bump(self, obj: dict) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def remove(self, group_version: str, plural: str, namespace: str, name: str, propagation: str) -> dict:
        gone = self.objects[(group_version, plural)].pop((namespace, name))
        if plural == "pods":
            self.logs.pop((namespace, name), None)
        if plural == "namespaces":  # everything in it goes too (at once: no Terminating phase here)
            self.namespaces.discard(name)
            for objects in self.objects.values():
                for key in [key for key in objects if key[0] == name]:
                    del objects[key]
        if propagation != "Orphan":  # the garbage collector deletes the dependents
            uid = gone["metadata"]["uid"]
            for (gv, other_plural), objects in self.objects.items():
                for (ns, other), obj in list(objects.items()):
                    owners = obj["metadata"].get("ownerReferences") or []
                    if any(owner.get("uid") == uid for owner in owners):
                        self.remove(gv, other_plural, ns, other, propagation)
        return gone

    # ---- the API ------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers, body) -> tuple[int, dict | str]:
        split = urlsplit(target)
        query = dict(parse_qsl(split.query))
        content_type = headers.get("Content-Type")
        self.requests.append(Recorded(method, split.path, query, content_type, copy.deepcopy(body)))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return status(401, "Unauthorized", "Unauthorized")
        route = parse_route(split.path)
        if route is None or (route.group_version, route.plural) not in RESOURCES:
            return status(404, "NotFound", "the server could not find the requested resource")
        forbidden = route.namespace if route.plural != "namespaces" else route.name
        if forbidden in self.forbidden:
            return _forbidden(method, route, query)
        with self._lock:
            self._sync_namespaces()
            if route.sub and route.sub.startswith("proxy"):
                if route.plural != "services" or method != "GET":
                    return _not_allowed()
                return k8s_cluster.proxy(self, route, route.sub.partition("/")[2])
            if route.sub and method != "GET":  # status and log are read here; controllers write status
                return _not_allowed()
            if route.name is None:
                if method == "GET":
                    return self._list(route, query)
                if method == "POST":
                    return self._create(route, body)
                return _not_allowed()
            current = self._objects(route).get((route.namespace or "", route.name))
            if method == "PATCH":
                return self._patch(route, query, (content_type or "").split(";")[0].strip(), body, current)
            if current is None:
                return not_found(route)
            if method == "GET":
                return self._read(route, query, current)
            if method == "DELETE":
                options = body if isinstance(body, dict) else {}
                policy = query.get("propagationPolicy") or options.get("propagationPolicy")
                if policy is None:  # batch/v1 Jobs keep the legacy default: their pods are orphaned
                    policy = "Orphan" if route.plural == "jobs" else "Background"
                gone = self.remove(route.group_version, route.plural, route.namespace or "", route.name,
                                   policy)
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "details": {"name": route.name, "group": route.group_version.rpartition("/")[0],
                                         "kind": route.plural, "uid": gone["metadata"]["uid"]}}
        return _not_allowed()

    def _objects(self, route: Route) -> dict[tuple[str, str], dict]:
        return self.objects[(route.group_version, route.plural)]

    def _sync_namespaces(self) -> None:
        """Tests add and remove names in `namespaces`; the Namespace objects follow."""
        stored = self.objects[("v1", "namespaces")]
        for name in self.namespaces - {n for _, n in stored}:
            self.store(Route("v1", "namespaces", None, name, None), {"apiVersion": "v1", "kind": "Namespace"})
        for key in [key for key in stored if key[1] not in self.namespaces]:
            del stored[key]

    def _read(self, route: Route, query: dict, current: dict) -> tuple[int, dict | str]:
        if route.sub == "log" and route.plural == "pods":
            return k8s_cluster.pod_log(self, route, query, current)
        if route.sub not in (None, "status"):
            return status(404, "NotFound", "the server could not find the requested resource")
        k8s_cluster.observed(self, route, current)  # a read is when a scripted controller makes progress
        return 200, copy.deepcopy(current)

    def _list(self, route: Route, query: dict) -> tuple[int, dict]:
        try:
            wanted = parse_selector(query.get("labelSelector", ""))
        except ValueError as exc:
            return status(400, "BadRequest", f"unable to parse requirement: {exc}")
        items = []
        for (namespace, _), obj in sorted(self._objects(route).items()):
            if route.namespace and namespace != route.namespace:
                continue
            if all(test(obj["metadata"].get("labels") or {}) for test in wanted):
                item = copy.deepcopy(obj)
                item.pop("apiVersion", None)  # list items carry no apiVersion/kind of their own
                item.pop("kind", None)
                items.append(item)
        kind = RESOURCES[(route.group_version, route.plural)][0]
        return 200, {"apiVersion": route.group_version, "kind": f"{kind}List",
                     "metadata": {"resourceVersion": str(self._version)}, "items": items}

    def _create(self, route: Route, body) -> tuple[int, dict]:
        name = ((body or {}).get("metadata") or {}).get("name") if isinstance(body, dict) else None
        problem = self._check_body(route, body, name)
        if problem:
            return problem
        route = Route(route.group_version, route.plural, route.namespace, name, None)
        if (route.namespace or "", name) in self._objects(route):
            return status(409, "AlreadyExists", f'{route.resource} "{name}" already exists', route)
        return self._admit_new(route, body)

    def _admit_new(self, route: Route, body: dict) -> tuple[int, dict]:
        if route.namespace and route.namespace not in self.namespaces:
            return status(404, "NotFound", f'namespaces "{route.namespace}" not found',
                          Route("v1", "namespaces", None, route.namespace, None))
        invalid = _invalid(route, body)
        if invalid:
            return invalid
        body = copy.deepcopy(body)
        body.setdefault("metadata", {})["managedFields"] = []
        created = self.store(route, body)
        if route.plural == "secrets":
            created.setdefault("type", "Opaque")
        if route.plural == "namespaces":
            self.namespaces.add(route.name)
        return 201, copy.deepcopy(created)

    def _patch(self, route: Route, query: dict, content_type: str, body, current) -> tuple[int, dict]:
        if content_type == _APPLY:
            if not query.get("fieldManager"):
                return status(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                              "Required value: is required for apply patch")
            problem = self._check_body(route, body, route.name)
            if problem:
                return problem
            if current is None:  # apply creates: the object is exactly the applied fields
                code, created = self._admit_new(route, body)
                if code == 201:
                    stored = self._objects(route)[(route.namespace or "", route.name)]
                    stored["metadata"]["managedFields"] = [_managed(query["fieldManager"])]
                    created = copy.deepcopy(stored)
                return code, created
        elif content_type not in _MERGE_TYPES:
            accepted = ", ".join(("application/json-patch+json", *_MERGE_TYPES, _APPLY))
            return status(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                          f"accepted media types include: {accepted}")
        if current is None:
            return not_found(route)
        patch = copy.deepcopy(body) if isinstance(body, dict) else {}
        if route.plural in _STATUS_SUBRESOURCE:
            patch.pop("status", None)
        patched = merge(copy.deepcopy(current), patch)
        invalid = _invalid(route, patched) or k8s_cluster.immutable(route, current, patched)
        if invalid:
            return invalid
        if content_type == _APPLY:
            managers = [m for m in patched["metadata"].get("managedFields") or []
                        if m.get("manager") != query["fieldManager"]]
            patched["metadata"]["managedFields"] = [*managers, _managed(query["fieldManager"])]
        if route.plural in _GENERATION and patched.get("spec") != current.get("spec"):
            patched["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if patched != current:
            self.bump(patched)
        self._objects(route)[(route.namespace or "", route.name)] = patched
        k8s_cluster.written(self, route, patched, current)
        return 200, copy.deepcopy(patched)

    def _check_body(self, route: Route, body, name: str | None) -> tuple[int, dict] | None:
        kind = RESOURCES[(route.group_version, route.plural)][0]
        if not isinstance(body, dict):
            return status(400, "BadRequest", f"the body of the request is not a {kind} object")
        if body.get("kind") != kind or body.get("apiVersion") != route.group_version:
            sent = f"{body.get('apiVersion')}, {body.get('kind')}"
            return status(400, "BadRequest", f"the object ({sent}) does not match the resource it was sent "
                          f"to ({route.group_version}, {kind})")
        metadata = body.get("metadata") or {}
        if not name:
            return status(422, "Invalid", f'{kind} "" is invalid: metadata.name: Required value: name is '
                          "required")
        if metadata.get("name") != name:
            return status(400, "BadRequest", f"the name of the object ({metadata.get('name')}) does not "
                          f"match the name on the URL ({name})")
        if route.namespace and metadata.get("namespace") not in (None, route.namespace):
            return status(400, "BadRequest", "the namespace of the provided object does not match the "
                          "namespace sent on the request")
        return None


def parse_route(path: str) -> Route | None:
    parts = [unquote(part) for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group_version, rest = "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        return None
    if not rest:
        return None
    if rest[0] != "namespaces" or len(rest) <= 2:  # cluster-scoped, or a Namespace itself
        return Route(group_version, rest[0], None, rest[1] if len(rest) > 1 else None, None)
    return Route(group_version, rest[2], rest[1], rest[3] if len(rest) > 3 else None,
                 "/".join(rest[4:]) or None)


def parse_selector(text: str):
    """Equality-based label selectors: a=b, a==b, a!=b, a (exists), !a."""
    tests = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda labels, k=term[1:]: k not in labels)
        elif term.replace("-", "").replace(".", "").replace("/", "").replace("_", "").isalnum():
            tests.append(lambda labels, k=term: k in labels)
        else:
            raise ValueError(repr(term))
    return tests


def merge(target, patch):
    """RFC 7386 JSON merge patch: maps merge, null deletes, lists are replaced."""
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge(target.get(key), value)
    return target


def _managed(manager: str) -> dict:
    return {"manager": manager, "operation": "Apply", "time": now(), "fieldsType": "FieldsV1"}


def _not_allowed() -> tuple[int, dict]:
    return status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def _invalid(route: Route, obj: dict) -> tuple[int, dict] | None:
    if route.plural != "secrets":
        return None
    for key, value in (obj.get("data") or {}).items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError):
            return status(422, "Invalid", f'Secret "{route.name}" is invalid: data[{key}]: Invalid value: '
                          "not base64", route)
    return None


def _forbidden(method: str, route: Route, query: dict) -> tuple[int, dict]:
    verb = {"GET": "get" if route.name else ("watch" if query.get("watch") else "list"), "POST": "create",
            "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method, method.lower())
    group = route.group_version.rpartition("/")[0]
    what = f'{route.resource} "{route.name}"' if route.name else route.resource
    where = f' in the namespace "{route.namespace}"' if route.namespace else " at the cluster scope"
    user = "system:serviceaccount:ci:runyard"
    return status(403, "Forbidden", f'{what} is forbidden: User "{user}" cannot {verb} resource '
                  f'"{route.plural}" in API group "{group}"{where}', route)


def not_found(route: Route) -> tuple[int, dict]:
    return status(404, "NotFound", f'{route.resource} "{route.name}" not found', route)


@contextmanager
def fake_kubernetes(token: str = "test-bearer-token"):
    api = FakeKubernetes(token)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:  # apply bodies are YAML (the python client sends JSON, which is YAML too)
                is_yaml = "yaml" in (self.headers.get("Content-Type") or "")
                body = (yaml.safe_load(raw) if is_yaml else json.loads(raw)) if raw else None
            except (ValueError, yaml.YAMLError):
                code, answer = status(400, "BadRequest", "the body of the request could not be decoded")
            else:
                code, answer = api.handle(self.command, self.path, self.headers, body)
            if isinstance(answer, str):
                data, content_type = answer.encode(), "text/plain"
            else:
                data, content_type = json.dumps(answer).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    # a short poll interval: shutdown() waits for the serving loop to notice, once per test
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
