"""The few Kubernetes API calls the deploy target makes, on one generic code path.

Every object is addressed by its REST path, built from apiVersion + kind (+ namespace, name), so applying a
ConfigMap and applying a Deployment are the same request: a server-side apply (PATCH with
application/apply-patch+yaml, fieldManager=runyard, force=true). Server-side apply makes a second deploy
of the same settings a no-op, creates what is missing, and leaves fields other managers own (an HPA's
replica count) alone; force takes over fields a `kubectl edit` changed, since runyard.yaml is the truth.

Requests go through the client's ApiClient (its kubeconfig, auth plugins, TLS and proxy settings) but
skip its typed models: the API server's JSON is read as plain dicts, the same shapes the manifests are
written in.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from urllib3.exceptions import HTTPError

if TYPE_CHECKING:  # the kubernetes client is an optional extra; nothing here needs it at import time
    from kubernetes.client import ApiClient

FIELD_MANAGER = "runyard"
APPLY_PATCH = "application/apply-patch+yaml"
REQUEST_TIMEOUT_S = 30.0  # one API request; the waits for a Job or a rollout are longer and polled

# kind -> (plural, namespaced), for every kind runyard writes or reads
_KINDS = {
    "Namespace": ("namespaces", False),
    "ServiceAccount": ("serviceaccounts", True),
    "ConfigMap": ("configmaps", True),
    "Secret": ("secrets", True),
    "PersistentVolumeClaim": ("persistentvolumeclaims", True),
    "Service": ("services", True),
    "Pod": ("pods", True),
    "NetworkPolicy": ("networkpolicies", True),
    "PodDisruptionBudget": ("poddisruptionbudgets", True),
    "HorizontalPodAutoscaler": ("horizontalpodautoscalers", True),
    "Ingress": ("ingresses", True),
    "Job": ("jobs", True),
    "Deployment": ("deployments", True),
}


def path(api_version: str, kind: str, namespace: str | None = None, name: str | None = None,
         subresource: str | None = None) -> str:
    """/api/v1/namespaces/ns/configmaps/x, /apis/apps/v1/namespaces/ns/deployments/x/status, …"""
    plural, namespaced = _KINDS[kind]
    parts = ["/api/v1" if api_version == "v1" else f"/apis/{api_version}"]
    if namespaced:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


def object_path(obj: dict) -> str:
    metadata = obj["metadata"]
    return path(obj["apiVersion"], obj["kind"], metadata.get("namespace"), metadata["name"])


def describe(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


class KubeError(Exception):
    """A request the API server refused (status set) or that never reached it (status None)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Kube:
    """JSON in and out of the API server, through one ApiClient."""

    def __init__(self, client: ApiClient, request_timeout_s: float = REQUEST_TIMEOUT_S):
        self.client = client
        self.timeout = request_timeout_s

    @property
    def host(self) -> str:
        return self.client.configuration.host

    def call(self, method: str, url_path: str, *, query: list | None = None, body: object = None,
             content_type: str | None = None, accept: str = "application/json",
             any_status: bool = False) -> tuple[int, bytes]:
        """The status and raw body; non-2xx raises KubeError unless `any_status`."""
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        request = self.client.param_serialize(method, url_path, query_params=query or None,
                                              header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            response = self.client.call_api(*request, _request_timeout=self.timeout)
            data = response.read() or b""
        except (HTTPError, OSError) as exc:
            reason = f"cannot reach the Kubernetes API at {self.host} ({type(exc).__name__})"
            raise KubeError(None, reason) from None
        except ApiException as exc:  # the client's own: a TLS failure (status 0), a 429 it gave up retrying
            reason = " ".join(str(exc.reason or "").split())[:300]
            raise KubeError(exc.status or None, f"{method} {url_path}: {exc.status} {reason}") from None
        if not any_status and not 200 <= response.status <= 299:
            raise KubeError(response.status, f"{method} {url_path}: {status_text(response.status, data)}")
        return response.status, data

    def get(self, url_path: str) -> dict | None:
        """The object, or None when the API server says 404."""
        try:
            return json.loads(self.call("GET", url_path)[1])
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, url_path: str, labels: dict[str, str]) -> list[dict]:
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        _, data = self.call("GET", url_path, query=[("labelSelector", selector)])
        return json.loads(data).get("items") or []

    def apply(self, obj: dict) -> dict:
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        _, data = self.call("PATCH", object_path(obj), query=query, body=obj, content_type=APPLY_PATCH)
        return json.loads(data)

    def delete(self, url_path: str) -> bool:
        """Deleted (dependents by the garbage collector, in the background); False when already gone."""
        try:
            self.call("DELETE", url_path, query=[("propagationPolicy", "Background")])
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    def text(self, url_path: str, query: list | None = None) -> str:
        return self.call("GET", url_path, query=query, accept="text/plain, */*")[1].decode(errors="replace")


def status_text(status: int, data: bytes) -> str:
    """"404 NotFound: deployments.apps "x" not found" from a v1 Status body (or the start of any body)."""
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and answer.get("kind") == "Status":
        return f"{status} {answer.get('reason') or ''}: {answer.get('message') or ''}".strip(": ")
    snippet = " ".join(data[:200].decode(errors="replace").split())
    return f"{status}: {snippet}" if snippet else str(status)
