"""What a cluster's controllers and kubelets do, scripted, for the Kubernetes API test double (k8s_api.py).

An API server only stores objects; in a cluster, controllers act on them. Here they act when a client reads
the object: a new Job shows its outcome (Complete, or Failed with a pod whose log tells why) after
`job_reads` reads; a Deployment whose spec changed shows the rollout's result after `rollout_reads` reads
(until then its status is the stale one of the previous generation, as a real controller's lags), either
rolled out or stuck (ProgressDeadlineExceeded, or pods waiting in ImagePullBackOff / CrashLoopBackOff).
Behind a Service, the pods that match its selector and are Ready answer /ready with a scripted status.
Tests change `Script` fields on the double before the call they script.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

READY_BODY = {"status": "ready", "checks": {"database": {"ok": True, "seconds": 0.004},
                                            "artifacts": {"ok": True, "seconds": 0.011}}}
SERVER = "server"  # the container a stuck rollout's pods wait on (else the first one)


@dataclass
class Script:
    job_outcome: str = "complete"  # complete | failed | running (never finishes)
    job_reads: int = 1  # reads of a new Job that still see it running (0: finished when created)
    job_message: str = "Job has reached the specified backoff limit"
    job_log: str = "INFO upgrading the schema\nINFO done\n"
    rollout: str = "ready"  # ready | deadline | ImagePullBackOff | CrashLoopBackOff
    rollout_reads: int = 1  # reads of a changed Deployment that still see the old status (0: none)
    ready_status: int = 200
    ready_body: dict = field(default_factory=lambda: copy.deepcopy(READY_BODY))


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str, route=None) -> tuple[int, dict]:
    """A v1 Status error, as the API server sends it."""
    answer = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": message, "reason": reason, "code": code}
    if route is not None and route.name:
        answer["details"] = {"name": route.name, "kind": route.plural}
        if "/" in route.group_version:
            answer["details"]["group"] = route.group_version.rpartition("/")[0]
    return code, answer


# ---- admission: the defaults the API server fills in ----------------------------------------------

def admit(api, route, obj: dict) -> None:
    spec = {} if route.plural in ("secrets", "configmaps", "serviceaccounts") else obj.setdefault("spec", {})
    if route.plural == "deployments":
        spec.setdefault("replicas", 1)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault("strategy", {"type": "RollingUpdate",
                                     "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
    elif route.plural == "jobs":
        uid = obj["metadata"]["uid"]
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
        labels.update({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                       "batch.kubernetes.io/job-name": route.name, "job-name": route.name})
    elif route.plural == "services":
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("clusterIP", f"10.96.{len(api.objects[('v1', 'services')]) % 250}.10")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
    elif route.plural == "persistentvolumeclaims":
        obj["status"] = {"phase": "Bound"}
    elif route.plural == "namespaces":
        obj["status"] = {"phase": "Active"}


def immutable(route, current: dict, patched: dict) -> tuple[int, dict] | None:
    fixed = (("jobs", "Job.batch", "template"), ("deployments", "Deployment.apps", "selector"))
    for plural, kind, path in fixed:
        if route.plural == plural and current["spec"].get(path) != patched.get("spec", {}).get(path):
            return status(422, "Invalid", f'{kind} "{route.name}" is invalid: spec.{path}: Invalid value: '
                          f"{json.dumps(patched.get('spec', {}).get(path))[:80]}: field is immutable", route)
    return None


# ---- controllers ----------------------------------------------------------------------------------

def written(api, route, obj: dict, previous: dict | None) -> None:
    """After a create or an update: start what a controller would start."""
    uid = obj["metadata"]["uid"]
    script = api.script
    if route.plural == "jobs" and previous is None:
        obj["status"] = {"startTime": now(), "active": 1}
        pod = _pod(api, obj, obj["spec"]["template"], f"{route.name}-{uuid.uuid4().hex[:5]}")
        pod["status"] = {"phase": "Running", "startTime": now()}
        api.logs[(route.namespace, pod["metadata"]["name"])] = script.job_log
        api.pending[uid] = [script.job_reads, ("job", script.job_outcome, script.job_message)]
    elif route.plural == "deployments":
        generation = obj["metadata"].get("generation")
        if previous is None or generation != previous["metadata"].get("generation"):
            api.pending[uid] = [script.rollout_reads, ("rollout", script.rollout)]
    else:
        return
    if api.pending.get(uid, [1])[0] <= 0:
        _settle(api, obj)


def observed(api, route, obj: dict) -> None:
    """A client read the object: the controller has moved on by one step (the read still sees the state
    before that step: a controller's status lags)."""
    entry = api.pending.get(obj["metadata"]["uid"])
    if entry is None:
        return
    if entry[0] > 0:
        entry[0] -= 1
        return
    _settle(api, obj)


def _settle(api, obj: dict) -> None:
    what, *how = api.pending[obj["metadata"]["uid"]][1]
    if what == "job" and how[0] == "running":
        return  # it never finishes
    del api.pending[obj["metadata"]["uid"]]
    if what == "job":
        _finish_job(api, obj, *how)
    else:
        _roll_out(api, obj, how[0])
    api.bump(obj)


def _finish_job(api, job: dict, outcome: str, message: str) -> None:
    succeeded = outcome == "complete"
    at = now()
    job["status"].pop("active", None)
    if succeeded:
        done = "Reached expected number of succeeded pods"
        job["status"].update({"succeeded": 1, "completionTime": at, "conditions": [
            _condition("SuccessCriteriaMet", "True", "CompletionsReached", done),
            _condition("Complete", "True", "CompletionsReached", done)]})
    else:
        job["status"].update({"failed": 1, "conditions": [
            _condition("FailureTarget", "True", "BackoffLimitExceeded", message),
            _condition("Failed", "True", "BackoffLimitExceeded", message)]})
    for pod in _owned(api, job):
        pod["status"]["phase"] = "Succeeded" if succeeded else "Failed"
        pod["status"]["containerStatuses"] = [
            {"name": c["name"], "image": c.get("image"), "ready": False, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0 if succeeded else 1,
                                      "reason": "Completed" if succeeded else "Error", "finishedAt": at}}}
            for c in pod["spec"].get("containers") or []]


def _roll_out(api, deployment: dict, mode: str) -> None:
    meta, spec = deployment["metadata"], deployment["spec"]
    wanted = spec.get("replicas", 1)
    template_hash = hashlib.sha256(json.dumps(spec["template"], sort_keys=True).encode()).hexdigest()[:10]
    pods = _owned(api, deployment)
    old = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") != template_hash]
    new = [p for p in pods if p not in old]
    for _ in range(wanted - len(new)):
        name = f"{meta['name']}-{template_hash}-{uuid.uuid4().hex[:5]}"
        pod = _pod(api, deployment, spec["template"], name, {"pod-template-hash": template_hash})
        pod["status"] = _pod_status(pod, mode)
        new.append(pod)
    replica_set = f'ReplicaSet "{meta["name"]}-{template_hash}"'
    if mode == "ready":
        for pod in old:
            api.remove("v1", "pods", meta["namespace"], pod["metadata"]["name"], "Background")
        counts = {"replicas": wanted, "updatedReplicas": wanted, "readyReplicas": wanted,
                  "availableReplicas": wanted}
        progressing = _condition("Progressing", "True", "NewReplicaSetAvailable", f"{replica_set} has "
                                 "successfully progressed.")
    else:  # the new pods never get ready; the old ones keep serving
        counts = {"replicas": wanted + len(old), "updatedReplicas": wanted, "readyReplicas": len(old),
                  "availableReplicas": len(old), "unavailableReplicas": wanted}
        if mode == "deadline":
            progressing = _condition("Progressing", "False", "ProgressDeadlineExceeded",
                                     f"{replica_set} has timed out progressing.")
        else:
            progressing = _condition("Progressing", "True", "ReplicaSetUpdated",
                                     f"{replica_set} is progressing.")
    available = counts["availableReplicas"] >= wanted
    deployment["status"] = {
        "observedGeneration": meta.get("generation", 1),
        **{k: v for k, v in counts.items() if v},  # the API server leaves zero counts out
        "conditions": [
            _condition("Available", "True" if available else "False",
                       "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                       "Deployment has minimum availability." if available else
                       "Deployment does not have minimum availability."),
            progressing]}


def _pod(api, owner: dict, template: dict, name: str, extra_labels: dict | None = None) -> dict:
    labels = {**((template.get("metadata") or {}).get("labels") or {}), **(extra_labels or {})}
    reference = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"labels": labels, "ownerReferences": [reference]},
            "spec": copy.deepcopy(template.get("spec") or {})}
    return api.create_object("v1", "pods", owner["metadata"]["namespace"], name, body)


def _pod_status(pod: dict, mode: str) -> dict:
    containers = pod["spec"].get("containers") or []
    names = [c["name"] for c in containers]
    stuck = SERVER if SERVER in names else names[0] if names else ""
    statuses = []
    for container in containers:
        state = {"running": {"startedAt": now()}}
        if mode != "ready" and container["name"] == stuck:
            if mode == "ImagePullBackOff":
                state = {"waiting": {"reason": "ImagePullBackOff",
                                     "message": f'Back-off pulling image "{container.get("image")}"'}}
            else:
                message = (f"back-off 40s restarting failed container={container['name']} "
                           f"pod={pod['metadata']['name']}")
                state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        statuses.append({"name": container["name"], "image": container.get("image"), "state": state,
                         "ready": "running" in state, "restartCount": 0 if "running" in state else 3})
    ready = all(s["ready"] for s in statuses)
    return {"phase": "Pending" if mode == "ImagePullBackOff" else "Running", "startTime": now(),
            "conditions": [_condition("Ready", "True" if ready else "False", None, None)],
            "containerStatuses": statuses}


def _owned(api, owner: dict) -> list[dict]:
    uid = owner["metadata"]["uid"]
    return [pod for (ns, _), pod in sorted(api.objects[("v1", "pods")].items())
            if any(ref.get("uid") == uid for ref in pod["metadata"].get("ownerReferences") or [])]


def _condition(kind: str, state: str, reason: str | None, message: str | None) -> dict:
    condition = {"type": kind, "status": state, "lastTransitionTime": now()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


# ---- subresources -----------------------------------------------------------------------------------

def pod_log(api, route, query: dict, pod: dict) -> tuple[int, dict | str]:
    containers = [c["name"] for c in pod["spec"].get("containers") or []]
    container = query.get("container")
    if container is None and len(containers) > 1:
        return status(400, "BadRequest", f"a container name must be specified for pod {route.name}, choose "
                      f"one of: [{' '.join(containers)}]")
    if container is not None and container not in containers:
        return status(400, "BadRequest", f"container {container} is not valid for pod {route.name}")
    lines = api.logs.get((route.namespace, route.name), "").splitlines(keepends=True)
    if query.get("tailLines"):
        lines = lines[-int(query["tailLines"]):]
    return 200, "".join(lines)


def proxy(api, route, path: str) -> tuple[int, dict | str]:
    """GET services/[scheme:]name[:port]/proxy/<path>: the pods behind the Service answer."""
    parts = route.name.split(":")
    name, port = (parts[1], parts[2]) if len(parts) == 3 else (parts[0], parts[1] if len(parts) > 1 else None)
    service = api.objects[("v1", "services")].get((route.namespace, name))
    if service is None:
        return status(404, "NotFound", f'services "{name}" not found', route)
    ports = service["spec"].get("ports") or []
    selector = service["spec"].get("selector") or {}
    endpoints = [pod for (ns, _), pod in api.objects[("v1", "pods")].items()
                 if ns == route.namespace and selector
                 and all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
                 and any(c["type"] == "Ready" and c["status"] == "True"
                         for c in (pod.get("status") or {}).get("conditions") or [])]
    known_port = port is None or any(port in (p.get("name"), str(p.get("port"))) for p in ports)
    if not endpoints or not known_port:
        return status(503, "ServiceUnavailable", f'no endpoints available for service "{route.name}"')
    if path == "ready":
        return api.script.ready_status, copy.deepcopy(api.script.ready_body)
    if path == "health":
        return 200, "OK"
    return 404, "404 page not found\n"
