"""Preflight of a Kubernetes deploy: what the settings expect to find in the cluster, checked before anything
is written.

Read only: GETs of the namespace, every Secret and ConfigMap the settings name, and the current Deployment.
Every problem is collected, so one run lists them all and the operator fixes them in one go. A Secret's
value is decoded once, to check the database URI's dialect; it never leaves this module, and messages name
the Secret and key only, never what they hold (not even the URI's scheme: a password pasted into the wrong
key would otherwise show up as one).
"""

from __future__ import annotations

import base64
import binascii
from typing import NoReturn
from urllib.parse import urlsplit

from infra.k8s.settings import SERVER_DIALECTS, KubernetesSettings
from server.errors import RunyardError
from toolkit.deploy.kube_rest import Kube, KubeError, path

MANAGED_BY = ("app.kubernetes.io/managed-by", "runyard")  # the label manifests.py puts on every object


def check(settings: KubernetesSettings, kube: Kube) -> dict | None:
    """The current Deployment (None on a first install); RunyardError listing every problem found."""
    problems: list[str] = []
    namespace = settings.namespace
    if not settings.create_namespace:
        try:
            if kube.get(path("v1", "Namespace", name=namespace)) is None:
                problems.append(f"namespace {namespace} does not exist: create it, or set create_namespace")
        except KubeError as exc:
            # Namespaces are cluster-scoped: a deployer with rights in its namespace alone may not read
            # them. The reads below, all inside the namespace, show whether access works.
            if exc.status != 403:
                problems.append(_cannot_read(exc, f"namespace {namespace}"))
    for secret, needs in _secrets(settings).items():
        problems += _check_secret(kube, settings, secret, needs)
    if settings.kerberos is not None:
        problems += _check_krb5(kube, settings, settings.kerberos.krb5_config_map)
    try:
        current = kube.get(path("apps/v1", "Deployment", namespace, settings.name))
    except KubeError as exc:
        current = None
        problems.append(_cannot_read(exc, f"Deployment {settings.name}"))
    label, ours = MANAGED_BY
    if current is not None and (current["metadata"].get("labels") or {}).get(label) != ours:
        problems.append(f"a Deployment {settings.name} exists that runyard does not manage (no "
                        f"{label}={ours} label): pick another name, or remove it")
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise RunyardError(f"Cannot deploy {settings.name} to namespace {namespace}; nothing was changed. "
                           f"Preflight found {count}:\n{listed}", "INVALID_PARAMETER_VALUE")
    return current


def _secrets(settings: KubernetesSettings) -> dict[str, list[tuple[str | None, str]]]:
    """Secret name -> (key or None for "the Secret itself", the setting that names it)."""
    needs: dict[str, list[tuple[str | None, str]]] = {}

    def need(secret: str, key: str | None, setting: str) -> None:
        needs.setdefault(secret, []).append((key, setting))

    for ref, setting in ((settings.backend_store_uri_secret, "--backend-store-uri-secret"),
                         (settings.backend_store_password_secret, "--backend-store-password-secret"),
                         (settings.htpasswd_secret, "htpasswd_secret"),
                         (settings.token_pepper_secret, "token_pepper_secret"),
                         (settings.kerberos.keytab if settings.kerberos else None, "kerberos.keytab")):
        if ref is not None:
            need(ref.secret, ref.key, setting)
    if settings.tls_secret:
        need(settings.tls_secret, "tls.crt", "tls_secret")
        need(settings.tls_secret, "tls.key", "tls_secret")
    if settings.env_secret:
        need(settings.env_secret, None, "env_secret")
    for name in settings.image_pull_secrets:
        need(name, None, "image_pull_secrets")
    # The Ingress's TLS Secret is left out on purpose: cert-manager often creates it after the Ingress.
    return needs


def _check_secret(kube: Kube, settings: KubernetesSettings, name: str,
                  needs: list[tuple[str | None, str]]) -> list[str]:
    settings_named = ", ".join(dict.fromkeys(setting for _, setting in needs))
    try:
        secret = kube.get(path("v1", "Secret", settings.namespace, name))
    except KubeError as exc:
        return [_cannot_read(exc, f"Secret {name} ({settings_named})")]
    if secret is None:
        return [f"Secret {name} not found in namespace {settings.namespace} (named by {settings_named})"]
    data = secret.get("data") or {}
    problems = [f"Secret {name} has no key {key} (named by {setting})"
                for key, setting in needs if key is not None and key not in data]
    uri_ref = settings.backend_store_uri_secret
    if uri_ref is not None and uri_ref.secret == name and uri_ref.key in data:
        problem = _database_uri_problem(data[uri_ref.key])
        if problem:
            problems.append(f"Secret {name}, key {uri_ref.key} (--backend-store-uri-secret): {problem}")
    return problems


def _database_uri_problem(encoded: str) -> str | None:
    try:
        uri = base64.b64decode(encoded, validate=True).decode("utf-8").strip()
        dialect = urlsplit(uri).scheme.split("+", 1)[0].lower()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return "does not hold a database URI as UTF-8 text"
    if dialect == "sqlite":
        return ("SQLite needs no secret: use --backend-store-uri sqlite:////data/… with --replicas 1 "
                "instead of --backend-store-uri-secret")
    if dialect not in SERVER_DIALECTS:
        return "does not hold a postgresql://, mysql:// or mssql:// URI"
    return None


def _check_krb5(kube: Kube, settings: KubernetesSettings, name: str) -> list[str]:
    try:
        config_map = kube.get(path("v1", "ConfigMap", settings.namespace, name))
    except KubeError as exc:
        return [_cannot_read(exc, f"ConfigMap {name} (kerberos.krb5_config_map)")]
    if config_map is None:
        return [f"ConfigMap {name} not found in namespace {settings.namespace} (kerberos.krb5_config_map)"]
    if "krb5.conf" not in (config_map.get("data") or {}):
        return [f"ConfigMap {name} has no key krb5.conf (kerberos.krb5_config_map)"]
    return []


def _cannot_read(exc: KubeError, what: str) -> str:
    if exc.status is None or exc.status == 401:
        _give_up(exc)
    return f"cannot read {what}: {exc.message}"


def _give_up(exc: KubeError) -> NoReturn:
    """No point in listing the same unreachable or refused API once per Secret."""
    hint = " (the kubeconfig's credentials were refused)" if exc.status == 401 else ""
    raise RunyardError(f"Cannot deploy; nothing was changed: {exc.message}{hint}",
                       "PERMISSION_DENIED" if exc.status == 401 else "INVALID_STATE")
