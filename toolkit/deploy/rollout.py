"""The waits of a Kubernetes deploy: the schema upgrade Job, the Deployment's rollout, and /ready.

Each wait polls the object's status (GETs, no watch: a watch buys nothing at a poll every few seconds and
breaks behind some proxies) until it is done, it failed, or its time is up. A failure says what is stuck
in the words the cluster uses (BackoffLimitExceeded, ImagePullBackOff, …), with the last lines of the
upgrade pod's log, so the operator needs no kubectl to find out why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from server.errors import RunyardError
from toolkit.deploy.kube_rest import Kube, KubeError, path, status_text

LOG_LINES = 20
_LOG_CHARS = 2000
_BENIGN_WAITS = ("ContainerCreating", "PodInitializing")  # every pod passes through these


# ---- the upgrade Job ------------------------------------------------------------------------------------

def job_state(job: dict) -> str:
    """complete | failed | running, from the Job's conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return "complete" if condition["type"] == "Complete" else "failed"
    return "running"


def run_upgrade_job(kube: Kube, job: dict, *, deployment: str, previous_image: str | None, timeout_s: float,
                    poll_s: float, say: Callable[[str], None]) -> dict:
    """Runs the Job (unless one of that name already completed) and waits for it; RunyardError if it fails."""
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    job_path = path("batch/v1", "Job", namespace, name)
    current = kube.get(job_path)
    if current is not None and job_state(current) == "complete":
        say(f"upgrade Job {name}: completed earlier for this image, not run again")
        return {"name": name, "ran": False, "seconds": None}
    started = time.monotonic()
    deadline = started + timeout_s
    if current is not None and job_state(current) == "failed":
        say(f"upgrade Job {name}: failed earlier, replacing it")  # a Job's pod template cannot be changed
        kube.delete(job_path)
        while kube.get(job_path) is not None:
            if time.monotonic() >= deadline:
                raise RunyardError(f"The failed upgrade Job {name} was not deleted within {timeout_s:g} s; "
                                   "the Deployment was NOT changed.", "INVALID_STATE")
            time.sleep(poll_s)
        current = None
    if current is None:
        kube.apply(job)
        say(f"upgrade Job {name}: started")
    else:
        say(f"upgrade Job {name}: already running, waiting for it")
    while True:
        current = kube.get(job_path)
        state = job_state(current) if current is not None else "gone"
        if state == "complete":
            seconds = round(time.monotonic() - started, 1)
            say(f"upgrade Job {name}: complete in {seconds:g} s")
            return {"name": name, "ran": True, "seconds": seconds}
        if state == "gone":
            reason = "the Job was deleted while it ran"
        elif state == "failed":
            reason = _failure_reason(current)
        elif time.monotonic() >= deadline:
            reason = f"it did not finish within {timeout_s:g} s (it keeps running in the cluster)"
        else:
            time.sleep(poll_s)
            continue
        raise _upgrade_failed(kube, namespace, name, reason, deployment, previous_image)


def _failure_reason(job: dict) -> str:
    for condition in job["status"].get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            parts = [condition.get("reason"), condition.get("message")]
            return ": ".join(part for part in parts if part) or "the Job failed"
    return "the Job failed"


def _upgrade_failed(kube: Kube, namespace: str, job: str, reason: str, deployment: str,
                    previous_image: str | None) -> RunyardError:
    if previous_image:
        serving = f"The Deployment {deployment} was NOT changed: {previous_image} keeps serving."
    else:
        serving = f"The Deployment {deployment} was NOT created: this is a first install, nothing serves yet."
    message = f"The schema upgrade Job {job} failed: {reason}. {serving}"
    stuck = pod_problems(kube, namespace, {"job-name": job})  # e.g. its image cannot be pulled
    if stuck:
        message += " Its pod: " + "; ".join(stuck[:3]) + "."
    log = job_log_tail(kube, namespace, job)
    if log:
        message += "\nLast lines of its log:\n" + "\n".join(f"  | {line}" for line in log.splitlines())
    message += "\nFix the cause and deploy again: a failed upgrade Job is replaced by a new one."
    return RunyardError(message, "INVALID_STATE")


def job_log_tail(kube: Kube, namespace: str, job: str) -> str:
    """The last lines of the newest pod of the Job ('' when there is none)."""
    try:
        pods = kube.list(path("v1", "Pod", namespace), {"job-name": job})
        if not pods:
            return ""
        pod = max(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        query = [("tailLines", str(LOG_LINES))] + ([("container", containers[0])] if containers else [])
        text = kube.text(path("v1", "Pod", namespace, pod["metadata"]["name"], "log"), query)
    except KubeError as exc:
        return f"(its log could not be read: {exc.message})"
    return text.strip()[-_LOG_CHARS:]


# ---- the rollout -----------------------------------------------------------------------------------------

def rollout_progress(deployment: dict) -> tuple[bool, str, str | None]:
    """(rolled out, progress in words, why it cannot finish or None) from the Deployment's status."""
    wanted = deployment.get("spec", {}).get("replicas", 1)
    status = deployment.get("status") or {}
    if status.get("observedGeneration", 0) < deployment["metadata"].get("generation", 1):
        return False, "waiting for the controller to pick up the new spec", None  # the status is the old one
    updated, available = status.get("updatedReplicas", 0), status.get("availableReplicas", 0)
    old = status.get("replicas", 0) - updated
    words = f"{updated}/{wanted} pods on the new spec, {available} available"
    if old > 0:
        words += f", {old} old still running"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            detail = (condition.get("message") or "").rstrip(".")
            return False, words, "ProgressDeadlineExceeded" + (f": {detail}" if detail else "")
    return updated == wanted and available >= wanted and old <= 0, words, None


def wait_for_rollout(kube: Kube, namespace: str, name: str, selector: dict[str, str], *, timeout_s: float,
                     poll_s: float, say: Callable[[str], None]) -> float:
    """Seconds until every replica runs the new spec and is available; RunyardError naming what is stuck."""
    started = time.monotonic()
    said = None
    while True:
        deployment = kube.get(path("apps/v1", "Deployment", namespace, name))
        if deployment is None:
            raise RunyardError(f"The Deployment {name} was deleted during its rollout.", "INVALID_STATE")
        done, words, failure = rollout_progress(deployment)
        if words != said:
            say(f"rollout: {words}")
            said = words
        if done:
            return round(time.monotonic() - started, 1)
        if failure is None and time.monotonic() >= started + timeout_s:
            failure = f"not finished within {timeout_s:g} s"
        if failure is not None:
            message = f"The rollout of Deployment {name} is stuck: {failure} ({words})."
            stuck = pod_problems(kube, namespace, selector)
            if stuck:
                message += " Pods: " + "; ".join(stuck[:6]) + "."
            raise RunyardError(message, "INVALID_STATE")
        time.sleep(poll_s)


def pod_problems(kube: Kube, namespace: str, selector: dict[str, str]) -> list[str]:
    """Why the server's pods are not ready, as the kubelet and scheduler put it."""
    try:
        pods = kube.list(path("v1", "Pod", namespace), selector)
    except KubeError as exc:
        return [f"the pods could not be listed: {exc.message}"]
    problems: list[str] = []
    for pod in pods:
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        containers = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
        for container in containers:
            state = container.get("state") or {}
            waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
            if waiting and waiting.get("reason") not in _BENIGN_WAITS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                problems.append(f"{name} container {container['name']} {waiting.get('reason')}{detail}")
            elif terminated.get("exitCode"):
                problems.append(f"{name} container {container['name']} exited with {terminated['exitCode']} "
                                f"({terminated.get('reason') or 'error'})")
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                why = condition.get("message") or condition.get("reason")
                problems.append(f"{name} not scheduled: {why}")
    return list(dict.fromkeys(problems))


# ---- /ready through the API server's service proxy ---------------------------------------------------

def probe_ready(kube: Kube, namespace: str, service: dict | None, name: str) -> dict:
    """The server's own /ready answer, through its Service; failures come back as data."""
    if service is None:
        return {"ok": False, "error": f"Service {name} not found"}
    ports = (service.get("spec") or {}).get("ports") or [{}]
    port = ports[0].get("name") or str(ports[0].get("port", ""))
    scheme = "https" if port == "https" else "http"  # the API server proxies to NGINX's TLS port itself
    url = path("v1", "Service", namespace, f"{scheme}:{name}:{port}", "proxy/ready")
    try:
        code, data = kube.call("GET", url, accept="application/json", any_status=True)
    except KubeError as exc:
        return {"ok": False, "error": exc.message}
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("checks"), dict):
        return {"ok": code == 200 and body.get("status") == "ready", "http_status": code,
                "status": body.get("status"), "checks": body["checks"]}
    return {"ok": False, "http_status": code, "error": status_text(code, data)}


def failing_checks(ready: dict) -> str:
    checks = ready.get("checks") or {}
    failing = [f"{name}: {check.get('reason') or 'failed'}" for name, check in checks.items()
               if not (isinstance(check, dict) and check.get("ok"))]
    return "; ".join(failing) or ready.get("error") or f"status {ready.get('status')!r}"
