"""`runyard deploy kubernetes`: apply, upgrade, roll out, check; status; destroy.

A deploy runs in an order that never lets new server code meet an old schema, nor a half-made change
serve:

  1. preflight   read only: the namespace, every Secret and ConfigMap the settings name (and the database
                 URI's dialect), the current Deployment. Any problem stops here, with all of them listed.
  2. supporting  server-side apply of the ServiceAccount, ConfigMap, volumes, Service, policies, HPA, Ingress.
  3. upgrade     when the image changes (or on a first install): the upgrade Job backs up and migrates the
                 database. If it fails the Deployment is not touched, and the old version keeps serving.
  4. rollout     apply the Deployment; wait until every replica runs the new spec and is available.
  5. ready       GET /ready through the API server's service proxy: the server's own checks, from inside.

`timeout_s` bounds each wait (the Job, the rollout) on its own. The kubernetes client is an optional extra
(`runyard[kubernetes]`), imported when a function needs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

from server.errors import RunyardError
from toolkit.deploy import preflight, rollout
from toolkit.deploy.kube_rest import Kube, KubeError, describe, path

POLL_S = 2.0
_MANAGED_BY = "app.kubernetes.io/managed-by"
_INSTANCE = "app.kubernetes.io/instance"
# destroy's order: what serves goes first, so nothing answers half-configured; then what routes to it
_DESTROY_ORDER = (("apps/v1", "Deployment"), ("v1", "Service"), ("networking.k8s.io/v1", "Ingress"),
                  ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
                  ("networking.k8s.io/v1", "NetworkPolicy"), ("batch/v1", "Job"), ("v1", "ConfigMap"),
                  ("v1", "ServiceAccount"), ("v1", "PersistentVolumeClaim"))


def _kubernetes():
    try:
        from kubernetes import client, config
    except ImportError:
        raise RunyardError("runyard deploy kubernetes needs the kubernetes client: "
                           "pip install 'runyard[kubernetes]'", "INVALID_STATE") from None
    return client, config


def _manifests():
    _kubernetes()  # the clear error first: manifests.py imports the client's models
    from infra.k8s import manifests
    return manifests


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A kubernetes ApiClient: from `kubeconfig` (else KUBECONFIG or ~/.kube/config when present), else the
    in-cluster service account. The client's global default configuration is left alone."""
    client, config = _kubernetes()
    configuration = client.Configuration()
    files = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    found = kubeconfig or any(os.path.exists(f) for f in files.split(os.pathsep) if f)
    try:
        if found:
            config.load_kube_config(config_file=files, context=context, client_configuration=configuration,
                                    persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
            config.load_incluster_config(client_configuration=configuration)
        else:
            where = f"no kubeconfig at {files}" + ("" if context is None else f" for context {context}")
            raise RunyardError(f"No usable Kubernetes configuration: {where}, and not running in a pod. Pass "
                               "--kubeconfig, or set KUBECONFIG.", "INVALID_STATE")
    except (config.ConfigException, OSError, ValueError) as exc:
        source = f"the kubeconfig {files}" if found else "the in-cluster service account"
        reason = " ".join(str(exc).split())
        raise RunyardError(f"No usable Kubernetes configuration from {source}: {reason}",
                           "INVALID_STATE") from None
    return client.ApiClient(configuration)


def render(settings) -> str:
    """The manifests as multi-document YAML (`--dry-run`), in apply order."""
    manifests = _manifests()
    return manifests.to_yaml(manifests.build(settings).objects)


class _Step:
    """What is being done, for the message of an API error that interrupts it."""

    def __init__(self, doing: str):
        self.doing = doing


@contextmanager
def _api_errors(step: _Step):
    """A refused or failed API request as one RunyardError naming the step it broke."""
    try:
        yield
    except KubeError as exc:
        code = "PERMISSION_DENIED" if exc.status in (401, 403) else "INVALID_STATE"
        raise RunyardError(f"Kubernetes API error while {step.doing}: {exc.message}", code) from None


def deploy(settings, client, *, timeout_s: float = 600, on_step: Callable[[str], None] | None = None,
           poll_s: float = POLL_S) -> dict:
    """Deploys `settings` through `client` (module docstring); the report, or RunyardError."""
    manifests = _manifests()
    say = on_step or (lambda _message: None)
    built = manifests.build(settings)
    supporting = manifests.to_dicts(built.supporting)
    job, deployment = manifests.to_dicts([built.upgrade_job, built.deployment])
    kube, name, namespace = Kube(client), settings.name, settings.namespace
    step = _Step("running the preflight checks")
    with _api_errors(step):
        current = preflight.check(settings, kube)
        previous_image = server_image(current, manifests.SERVER_CONTAINER)
        now = "first install" if current is None else f"the Deployment is at {previous_image}"
        say(f"preflight: ok ({now})")
        for obj in supporting:
            step.doing = f"applying {describe(obj)} (objects applied before it stay applied)"
            kube.apply(obj)
            say(f"applied {describe(obj)}")
        upgrade = None
        if current is None or previous_image != settings.image:
            step.doing = f"running the upgrade Job {job['metadata']['name']} (the Deployment was not changed)"
            upgrade = rollout.run_upgrade_job(kube, job, deployment=name, previous_image=previous_image,
                                              timeout_s=timeout_s, poll_s=poll_s, say=say)
        else:
            say(f"image unchanged ({settings.image}): no schema upgrade")
        step.doing = f"applying Deployment/{name}"
        kube.apply(deployment)
        say(f"applied Deployment/{name}")
        step.doing = f"waiting for the rollout of Deployment/{name}"
        rollout_seconds = rollout.wait_for_rollout(kube, namespace, name, manifests.selector_labels(settings),
                                                   timeout_s=timeout_s, poll_s=poll_s, say=say)
    service = next((o for o in supporting if o["kind"] == "Service" and o["metadata"]["name"] == name), None)
    ready = rollout.probe_ready(kube, namespace, service, name)
    if not ready["ok"]:
        http = f" (HTTP {ready['http_status']})" if ready.get("http_status") else ""
        raise RunyardError(f"Deployment {name} rolled out {settings.image}, but /ready fails{http}: "
                           f"{rollout.failing_checks(ready)}", "INVALID_STATE")
    say("ready: " + ", ".join(f"{check} ok" for check in ready["checks"]))
    return {"namespace": namespace, "name": name, "image": settings.image, "previous_image": previous_image,
            "applied": [describe(o) for o in supporting] + [f"Deployment/{name}"], "upgrade_job": upgrade,
            "rollout_seconds": rollout_seconds,
            "ready": {"status": ready["status"], "checks": ready["checks"]}}


def server_image(deployment: dict | None, container: str = "server") -> str | None:
    if deployment is None:
        return None
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    return next((c.get("image") for c in containers if c.get("name") == container), None)


def _ours(name: str) -> dict[str, str]:
    return {_MANAGED_BY: "runyard", _INSTANCE: name}  # manifests.py labels every object so


def status(name: str, namespace: str, client) -> dict:
    """What runs: the Deployment, the last upgrade Job, /ready. Problems past the first read are data."""
    kube = Kube(client)
    with _api_errors(_Step(f"reading Deployment/{name} in {namespace}")):
        current = kube.get(path("apps/v1", "Deployment", namespace, name))
    labels = (current or {}).get("metadata", {}).get("labels") or {}
    if current is None or labels.get(_MANAGED_BY) != "runyard":
        raise RunyardError(f"{name} is not deployed in namespace {namespace}: no Deployment {name} managed "
                           "by runyard.", "RESOURCE_DOES_NOT_EXIST")
    done, words, failure = rollout.rollout_progress(current)
    state = current.get("status") or {}
    report = {"namespace": namespace, "name": name, "deployment": {
        "image": server_image(current), "replicas": current["spec"].get("replicas", 1),
        "updated": state.get("updatedReplicas", 0), "ready": state.get("readyReplicas", 0),
        "available": state.get("availableReplicas", 0), "rolled_out": done, "progress": failure or words,
        "conditions": [{k: c.get(k) for k in ("type", "status", "reason", "message")}
                       for c in state.get("conditions") or []]}}
    try:
        jobs = kube.list(path("batch/v1", "Job", namespace), _ours(name))
        report["upgrade_job"] = _job_summary(max(jobs, key=_created)) if jobs else None
    except KubeError as exc:
        report["upgrade_job"] = {"error": exc.message}
    try:
        service = kube.get(path("v1", "Service", namespace, name))
    except KubeError as exc:
        report["ready"] = {"ok": False, "error": exc.message}
    else:
        report["ready"] = rollout.probe_ready(kube, namespace, service, name)
    return report


def _created(obj: dict) -> tuple[str, str]:
    return obj["metadata"].get("creationTimestamp") or "", obj["metadata"]["name"]


def _job_summary(job: dict) -> dict:
    state = job.get("status") or {}
    containers = job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}]
    failed = [c.get("message") for c in state.get("conditions") or []
              if c.get("type") == "Failed" and c.get("status") == "True"]
    return {"name": job["metadata"]["name"], "image": containers[0].get("image"),
            "state": rollout.job_state(job), "started": state.get("startTime"),
            "finished": state.get("completionTime"), "message": failed[0] if failed else None}


def destroy(name: str, namespace: str, client, *, delete_volumes: bool = False) -> dict:
    """Deletes what runyard made for `name` in `namespace`: never Secrets (their operator owns them), never
    the Namespace, volumes only with `delete_volumes`. Running it again deletes nothing more."""
    kube = Kube(client)
    deleted: list[str] = []
    kept: list[str] = []
    step = _Step("")
    with _api_errors(step):
        for api_version, kind in _DESTROY_ORDER:
            step.doing = f"listing the {kind}s of {name}"
            for obj in sorted(kube.list(path(api_version, kind, namespace), _ours(name)), key=_created):
                what = f"{kind}/{obj['metadata']['name']}"
                if kind == "PersistentVolumeClaim" and not delete_volumes:
                    kept.append(what)
                    continue
                step.doing = f"deleting {what} (what is listed before it was deleted)"
                if kube.delete(path(api_version, kind, namespace, obj["metadata"]["name"])):
                    deleted.append(what)
    return {"namespace": namespace, "name": name, "deleted": deleted, "kept": kept}
