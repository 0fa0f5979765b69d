"""toolkit/deploy/kubernetes.py: deploy, status and destroy through the real kubernetes client, against the
recorded-API test double of the API server (tests/helpers/k8s_api.py; no API server can run here)."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from helpers.k8s_api import fake_kubernetes
from kubernetes import client as k8s_client

from infra.k8s import manifests
from infra.k8s.settings import Autoscaling, Ingress, Kerberos, KubernetesSettings, SecretRef
from server.errors import RunyardError
from toolkit.deploy import kubernetes as deploy_k8s
from toolkit.deploy.kube_rest import object_path

IMAGE_1 = "ghcr.io/acme/runyard:1.4.2"
IMAGE_2 = "ghcr.io/acme/runyard:1.5.0"
DB_URI = "postgresql+psycopg://runyard:Db-Pa55word@db.internal:5432/runyard"
HTPASSWD = "alice:$2y$12$9Hk2bkN0KdRrYzFh0p6k2u7pWcl3zvV4y6yYg2m3c0o9Q2b4nYxS"
APPLY = "application/apply-patch+yaml"
OURS = {"app.kubernetes.io/managed-by": "runyard", "app.kubernetes.io/instance": "runyard"}


@pytest.fixture
def k8s():
    with fake_kubernetes() as api:
        api.namespaces.add("ml")
        api.put("ml", "runyard-db", {"uri": DB_URI})
        api.put("ml", "runyard-auth", {"htpasswd": HTPASSWD})
        yield api


@pytest.fixture
def client(k8s, tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with deploy_k8s.api_client(str(k8s.kubeconfig(tmp_path / "kubeconfig"))) as api_client:
        yield api_client


def settings(**changes) -> KubernetesSettings:
    values = {"name": "runyard", "namespace": "ml", "image": IMAGE_1, "artifacts_destination": "s3://ml/runyard",
              "backend_store_uri_secret": SecretRef("runyard-db", "uri"),
              "htpasswd_secret": SecretRef("runyard-auth", "htpasswd")}
    return KubernetesSettings(**{**values, **changes})


def deploy(chosen: KubernetesSettings, client, timeout_s: float = 5.0, steps: list | None = None) -> dict:
    return deploy_k8s.deploy(chosen, client, timeout_s=timeout_s, poll_s=0.005,
                             on_step=None if steps is None else steps.append)


def writes_to(k8s, plural: str) -> list[int]:
    """Indexes, in the recording, of the writes to one resource type."""
    return [i for i, r in enumerate(k8s.requests) if r.method != "GET" and f"/{plural}" in r.path]


def deployment(k8s) -> dict | None:
    return k8s.get("apps/v1", "deployments", "ml", "runyard")


def server_images(k8s) -> set[str]:
    pods = [p for (ns, _), p in k8s.objects[("v1", "pods")].items()
            if ns == "ml" and p["metadata"]["labels"].get("app.kubernetes.io/instance") == "runyard"]
    return {c["image"] for p in pods for c in p["spec"]["containers"] if c["name"] == "server"}


# ---- the double itself answers like an API server -----------------------------------------------------

def test_the_double_answers_the_typed_client_like_an_api_server(k8s, client):
    apps, core = k8s_client.AppsV1Api(client), k8s_client.CoreV1Api(client)
    body = manifests.to_dicts([manifests.build(settings()).deployment])[0]
    with pytest.raises(k8s_client.ApiException) as caught:  # server-side apply names its manager
        apps.patch_namespaced_deployment("runyard", "ml", body, _content_type=APPLY)
    assert caught.value.status == 422 and "fieldManager" in caught.value.body

    def apply():
        return apps.patch_namespaced_deployment("runyard", "ml", body, field_manager="t", _content_type=APPLY)

    created = apply()
    assert created.metadata.generation == 1 and created.metadata.uid and created.metadata.resource_version
    assert apply().metadata.generation == 1  # the same spec: no new generation
    body["spec"]["template"]["spec"]["containers"][0]["image"] = IMAGE_2
    changed = apply()
    assert changed.metadata.generation == 2 and changed.metadata.uid == created.metadata.uid

    listed = apps.list_namespaced_deployment("ml", label_selector="app.kubernetes.io/instance=runyard")
    assert [d.metadata.name for d in listed.items] == ["runyard"]
    assert apps.list_namespaced_deployment("ml", label_selector="app.kubernetes.io/instance=x").items == []
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    core.create_namespaced_config_map("ml", config_map)
    for call, status, reason in ((lambda: core.create_namespaced_config_map("ml", config_map), 409,
                                  "AlreadyExists"),
                                 (lambda: core.read_namespaced_config_map("absent", "ml"), 404, "NotFound")):
        with pytest.raises(k8s_client.ApiException) as caught:
            call()
        answer = json.loads(caught.value.body)
        assert (caught.value.status, answer["kind"], answer["reason"]) == (status, "Status", reason)


# ---- deploy -------------------------------------------------------------------------------------------

def test_first_install_applies_supporting_objects_then_the_job_then_the_deployment(k8s, client):
    chosen = settings()
    steps: list[str] = []
    report = deploy(chosen, client, steps=steps)

    built = manifests.build(chosen)
    expected = [object_path(o) for o in manifests.to_dicts(built.objects)]
    writes = k8s.writes()
    assert [w.path for w in writes] == expected  # supporting (in order) -> Job -> Deployment, once each
    assert writes_to(k8s, "jobs")[0] < writes_to(k8s, "deployments")[0]
    for write in writes:  # server-side apply, as the python client really sent it
        assert (write.method, write.content_type) == ("PATCH", APPLY)
        assert write.query == {"fieldManager": "runyard", "force": "true"}
        assert write.body["kind"] and write.body["metadata"]["name"]
    assert not writes_to(k8s, "secrets")

    job_name = manifests.upgrade_job_name(chosen)
    assert report["namespace"] == "ml" and report["name"] == "runyard"
    assert report["image"] == IMAGE_1 and report["previous_image"] is None
    assert report["upgrade_job"]["name"] == job_name and report["upgrade_job"]["ran"] is True
    assert report["upgrade_job"]["seconds"] >= 0 and report["rollout_seconds"] >= 0
    assert report["ready"]["status"] == "ready"
    assert set(report["ready"]["checks"]) == {"database", "artifacts"}
    assert report["applied"][-1] == "Deployment/runyard"
    assert any("upgrade Job" in step for step in steps) and any("rollout" in step for step in steps)

    stored = deployment(k8s)
    assert stored["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE_1
    assert server_images(k8s) == {IMAGE_1}
    job = k8s.get("batch/v1", "jobs", "ml", job_name)
    assert job["status"]["succeeded"] == 1
    # What the double stored reads back into the client's typed models: the shapes are the API's.
    api = k8s_client.ApiClient()
    api.deserialize(json.dumps(stored), "V1Deployment", "application/json")
    api.deserialize(json.dumps(job), "V1Job", "application/json")


def test_an_upgrade_runs_the_new_job_before_the_deployment_changes(k8s, client):
    deploy(settings(), client)
    k8s.requests.clear()
    report = deploy(settings(image=IMAGE_2), client)

    assert report["previous_image"] == IMAGE_1 and report["image"] == IMAGE_2
    job_name = manifests.upgrade_job_name(settings(image=IMAGE_2))
    assert report["upgrade_job"]["name"] == job_name and report["upgrade_job"]["ran"]
    job_writes = writes_to(k8s, "jobs")
    assert [k8s.requests[i].path.rsplit("/", 1)[1] for i in job_writes] == [job_name]
    assert job_writes[0] < writes_to(k8s, "deployments")[0]
    # The controller's first answer after the apply is the old generation's status (all replicas
    # available); taking it for the new rollout would report pods of IMAGE_1 as done.
    assert server_images(k8s) == {IMAGE_2}


def test_the_same_image_again_runs_no_job_and_reapplies_idempotently(k8s, client):
    deploy(settings(), client)
    before = deployment(k8s)
    k8s.requests.clear()
    report = deploy(settings(), client)

    assert report["upgrade_job"] is None and report["previous_image"] == IMAGE_1
    assert not writes_to(k8s, "jobs")
    assert len(writes_to(k8s, "deployments")) == 1
    after = deployment(k8s)
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"] == before["spec"]


def test_an_earlier_completed_job_for_the_image_is_not_run_again(k8s, client):
    deploy(settings(), client)
    deploy(settings(image=IMAGE_2), client)
    k8s.requests.clear()
    report = deploy(settings(), client)  # back to IMAGE_1, whose Job completed before

    assert report["upgrade_job"] == {"name": manifests.upgrade_job_name(settings()), "ran": False,
                                     "seconds": None}
    assert not writes_to(k8s, "jobs")
    assert server_images(k8s) == {IMAGE_1}


def test_a_failed_upgrade_job_leaves_the_deployment_untouched(k8s, client):
    deploy(settings(), client)
    before = json.dumps(deployment(k8s), sort_keys=True)
    k8s.requests.clear()
    k8s.script.job_outcome = "failed"
    k8s.script.job_log = "INFO backup written\nERROR relation \"runs\" is locked by another session\n"

    with pytest.raises(RunyardError) as caught:
        deploy(settings(image=IMAGE_2), client)
    message = caught.value.message
    job_name = manifests.upgrade_job_name(settings(image=IMAGE_2))
    assert f"schema upgrade Job {job_name} failed" in message
    assert "BackoffLimitExceeded" in message and "backoff limit" in message
    assert 'relation "runs" is locked' in message  # the tail of the Job pod's log
    assert "NOT changed" in message and f"{IMAGE_1} keeps serving" in message
    assert json.dumps(deployment(k8s), sort_keys=True) == before
    assert not writes_to(k8s, "deployments")
    assert server_images(k8s) == {IMAGE_1}

    # Fixed: the failed Job is deleted (its pod with it) and a new one runs, then the Deployment changes.
    k8s.script.job_outcome = "complete"
    k8s.requests.clear()
    report = deploy(settings(image=IMAGE_2), client)
    delete = [r for r in k8s.requests if r.method == "DELETE"]
    assert [r.path.rsplit("/", 1)[1] for r in delete] == [job_name]
    assert delete[0].query == {"propagationPolicy": "Background"}
    assert report["upgrade_job"]["ran"] and server_images(k8s) == {IMAGE_2}
    assert writes_to(k8s, "jobs")[-1] < writes_to(k8s, "deployments")[0]


def test_a_failed_first_install_says_nothing_serves_yet(k8s, client):
    k8s.script.job_outcome = "failed"
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), client)
    assert "first install" in caught.value.message and "nothing serves yet" in caught.value.message
    assert deployment(k8s) is None and not writes_to(k8s, "deployments")


def test_an_upgrade_job_that_never_finishes_times_out_without_touching_the_deployment(k8s, client):
    deploy(settings(), client)
    k8s.requests.clear()
    k8s.script.job_outcome = "running"
    with pytest.raises(RunyardError) as caught:
        deploy(settings(image=IMAGE_2), client, timeout_s=0.1)
    assert "did not finish within 0.1 s" in caught.value.message
    assert f"{IMAGE_1} keeps serving" in caught.value.message
    assert not writes_to(k8s, "deployments")


@pytest.mark.parametrize("mode, expected", [
    ("deadline", ["ProgressDeadlineExceeded", "has timed out progressing", "CrashLoopBackOff"]),
    ("ImagePullBackOff", ["not finished within", "container server ImagePullBackOff",
                          f'Back-off pulling image "{IMAGE_2}"']),
    ("CrashLoopBackOff", ["not finished within", "container server CrashLoopBackOff"]),
])
def test_a_stuck_rollout_names_what_is_stuck(k8s, client, mode, expected):
    deploy(settings(), client)
    k8s.script.rollout = mode
    with pytest.raises(RunyardError) as caught:
        deploy(settings(image=IMAGE_2), client, timeout_s=0.3)
    message = caught.value.message
    assert "rollout of Deployment runyard is stuck" in message
    for text in expected:
        assert text in message
    if mode == "deadline":  # seen in the Deployment's condition at once, not by waiting out the timeout
        assert "not finished within" not in message


def test_ready_failing_after_a_good_rollout_is_an_error_with_the_reasons(k8s, client):
    k8s.script.ready_status = 503
    k8s.script.ready_body = {"status": "not_ready", "checks": {
        "database": {"ok": True},
        "artifacts": {"ok": False, "reason": "PUT s3://ml/runyard/.runyard-probe-1: AccessDenied"}}}
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), client)
    message = caught.value.message
    assert "/ready fails (HTTP 503)" in message
    assert "artifacts: PUT s3://ml/runyard/.runyard-probe-1: AccessDenied" in message
    assert "database" not in message
    proxied = [r.path for r in k8s.requests if "/proxy/" in r.path]
    assert proxied == ["/api/v1/namespaces/ml/services/http:runyard:http/proxy/ready"]


def test_with_tls_the_probe_goes_through_the_https_port(k8s, client):
    k8s.put("ml", "runyard-tls", {"tls.crt": "CERT", "tls.key": "KEY"}, "kubernetes.io/tls")
    deploy(settings(tls_secret="runyard-tls"), client)
    proxied = [r.path for r in k8s.requests if "/proxy/" in r.path]
    assert proxied == ["/api/v1/namespaces/ml/services/https:runyard:https/proxy/ready"]


def test_create_namespace_applies_the_namespace_first(k8s, client):
    chosen = settings(namespace="fresh", create_namespace=True, auth="token", htpasswd_secret=None,
                      backend_store_uri_secret=None, backend_store_uri="postgresql://runyard@db.internal/runyard")
    deploy(chosen, client)
    assert k8s.writes()[0].path == "/api/v1/namespaces/fresh"
    assert "fresh" in k8s.namespaces and deployment(k8s) is None
    assert k8s.get("apps/v1", "deployments", "fresh", "runyard") is not None


# ---- preflight ----------------------------------------------------------------------------------------

def test_preflight_lists_every_problem_and_writes_nothing(k8s, client):
    sqlite_uri = "sqlite:////data/secret-place/mlflow.db"
    k8s.put("ml", "runyard-db", {"uri": sqlite_uri})
    k8s.put("ml", "runyard-auth", {"users": HTPASSWD})  # the wrong key
    k8s.put("ml", "runyard-tls", {"tls.crt": "-----BEGIN CERTIFICATE-----MIIB"}, "kubernetes.io/tls")
    k8s.put("ml", "keytab", {"runyard.keytab": "BQIAAABHAAIAC0VYQU1QTEUuQ09N"})
    k8s.put_config_map("ml", "krb5", {"krb5.cfg": "[libdefaults]"})
    k8s.put("ml", "runyard", {"x": "y"})  # nothing to do with us: not a problem
    chosen = settings(
        tls_secret="runyard-tls", token_pepper_secret=SecretRef("runyard-pepper", "pepper"),
        env_secret="cloud-credentials", artifacts_destination="hdfs://namenode:9870/runyard",
        kerberos=Kerberos(SecretRef("keytab", "runyard.keytab"), "krb5", "runyard@EXAMPLE.COM"))

    with pytest.raises(RunyardError) as caught:
        deploy(chosen, client)
    message = caught.value.message
    expected = ["runyard-db, key uri (--backend-store-uri-secret): SQLite needs no secret",
                "Secret runyard-auth has no key htpasswd (named by htpasswd_secret)",
                "Secret runyard-tls has no key tls.key (named by tls_secret)",
                "Secret runyard-pepper not found in namespace ml (named by token_pepper_secret)",
                "Secret cloud-credentials not found in namespace ml (named by env_secret)",
                "ConfigMap krb5 has no key krb5.conf"]
    for problem in expected:
        assert problem in message
    assert f"Preflight found {len(expected)} problems" in message and "nothing was changed" in message
    assert message.count("\n  - ") == len(expected)
    assert k8s.writes() == []
    for value in (sqlite_uri, "secret-place", HTPASSWD, "BEGIN CERTIFICATE", "BQIAAABH"):
        assert value not in message and base64.b64encode(value.encode()).decode() not in message


@pytest.mark.parametrize("value", ["hunter2-is-the-password", "s3cr3t:pa55@db.internal/runyard",
                                   "mongodb://u:pa55@db.internal/x"])
def test_preflight_refuses_unknown_dialects_without_showing_the_value(k8s, client, value):
    k8s.put("ml", "runyard-db", {"uri": value})
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), client)
    message = caught.value.message
    assert "does not hold a postgresql://, mysql:// or mssql:// URI" in message
    for part in ("hunter2", "s3cr3t", "pa55", "mongodb", "db.internal"):
        assert part not in message
    assert k8s.writes() == []


def test_preflight_reports_a_missing_namespace_and_its_secrets(k8s, client):
    with pytest.raises(RunyardError) as caught:
        deploy(settings(namespace="nowhere"), client)
    message = caught.value.message
    assert "namespace nowhere does not exist" in message and "create_namespace" in message
    assert "Secret runyard-db not found in namespace nowhere" in message
    assert "Secret runyard-auth not found in namespace nowhere" in message
    assert k8s.writes() == []


def test_preflight_refuses_a_deployment_runyard_does_not_manage(k8s, client):
    k8s.create_object("apps/v1", "deployments", "ml", "runyard", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"labels": {"app": "mlflow"}},
        "spec": {"selector": {"matchLabels": {"app": "mlflow"}}, "template": {
            "metadata": {"labels": {"app": "mlflow"}}, "spec": {"containers": [{"name": "mlflow",
                                                                               "image": "mlflow:2"}]}}}})
    with pytest.raises(RunyardError, match="a Deployment runyard exists that runyard does not manage"):
        deploy(settings(), client)
    assert k8s.writes() == []


def test_refused_credentials_and_forbidden_namespaces_are_clear_errors(k8s, client, tmp_path):
    k8s.forbidden.add("ml")
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), client)
    assert caught.value.message.count("403 Forbidden") == 3  # two Secrets and the Deployment, all listed
    assert k8s.writes() == []

    k8s.forbidden.clear()
    wrong = deploy_k8s.api_client(str(k8s.kubeconfig(tmp_path / "wrong", token="not-the-token")))
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), wrong)
    assert caught.value.error_code == "PERMISSION_DENIED"
    assert "401" in caught.value.message and "credentials were refused" in caught.value.message
    assert k8s.writes() == []


# ---- status ---------------------------------------------------------------------------------------------

def test_status_of_an_undeployed_name_is_a_clear_error(k8s, client):
    with pytest.raises(RunyardError) as caught:
        deploy_k8s.status("runyard", "ml", client)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert "runyard is not deployed in namespace ml" in caught.value.message


def test_status_shows_the_deployment_the_last_upgrade_job_and_ready(k8s, client):
    deploy(settings(), client)
    first_job = k8s.objects[("batch/v1", "jobs")][("ml", manifests.upgrade_job_name(settings()))]
    first_job["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"  # an older Job
    deploy(settings(image=IMAGE_2), client)

    count = len(k8s.writes())
    report = deploy_k8s.status("runyard", "ml", client)
    assert len(k8s.writes()) == count  # status only reads
    assert report["deployment"]["image"] == IMAGE_2
    assert {k: report["deployment"][k] for k in ("replicas", "updated", "ready", "available")} == {
        "replicas": 2, "updated": 2, "ready": 2, "available": 2}
    assert report["deployment"]["rolled_out"] is True
    assert {c["type"] for c in report["deployment"]["conditions"]} == {"Available", "Progressing"}
    assert report["upgrade_job"]["name"] == manifests.upgrade_job_name(settings(image=IMAGE_2))
    assert report["upgrade_job"]["state"] == "complete" and report["upgrade_job"]["image"] == IMAGE_2
    assert report["ready"]["ok"] is True and report["ready"]["status"] == "ready"


def test_status_reports_failures_as_data(k8s, client):
    deploy(settings(), client)
    k8s.script.ready_status = 503
    k8s.script.ready_body = {"status": "not_ready",
                             "checks": {"database": {"ok": False, "reason": "timeout"}}}
    report = deploy_k8s.status("runyard", "ml", client)
    assert report["ready"]["ok"] is False and report["ready"]["http_status"] == 503
    assert report["ready"]["checks"]["database"]["reason"] == "timeout"

    for key in [key for key in k8s.objects[("v1", "pods")] if key[0] == "ml"]:
        del k8s.objects[("v1", "pods")][key]  # every server pod gone: nothing behind the Service
    report = deploy_k8s.status("runyard", "ml", client)
    assert report["ready"]["ok"] is False and "no endpoints available" in report["ready"]["error"]


# ---- destroy -------------------------------------------------------------------------------------------

def test_destroy_deletes_what_runyard_made_deployment_first_and_keeps_volumes_and_secrets(k8s, client):
    chosen = settings(replicas=2, autoscaling=Autoscaling(2, 4), ingress=Ingress("mlflow.example.com"))
    deploy(chosen, client)
    k8s.put_config_map("ml", "someone-elses", {"a": "b"})
    k8s.create_object("v1", "configmaps", "ml", "other-instance", {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"labels": {**OURS, "app.kubernetes.io/instance": "other"}}})
    k8s.requests.clear()

    report = deploy_k8s.destroy("runyard", "ml", client)
    job_name = manifests.upgrade_job_name(chosen)
    assert report["deleted"] == [
        "Deployment/runyard", "Service/runyard", "Ingress/runyard", "HorizontalPodAutoscaler/runyard",
        "PodDisruptionBudget/runyard", "NetworkPolicy/runyard", f"Job/{job_name}", "ConfigMap/runyard-nginx",
        "ServiceAccount/runyard"]
    assert report["kept"] == ["PersistentVolumeClaim/runyard-backups"]
    deletes = [r for r in k8s.requests if r.method == "DELETE"]
    assert "/deployments/" in deletes[0].path
    assert all(r.query == {"propagationPolicy": "Background"} for r in deletes)
    assert not any("/secrets" in r.path or r.path.endswith("/namespaces/ml") for r in deletes)
    assert k8s.data("ml", "runyard-db") == {"uri": DB_URI} and "ml" in k8s.namespaces
    assert k8s.get("v1", "persistentvolumeclaims", "ml", "runyard-backups") is not None
    assert k8s.get("v1", "configmaps", "ml", "someone-elses") is not None
    assert k8s.get("v1", "configmaps", "ml", "other-instance") is not None
    assert not [key for key in k8s.objects[("v1", "pods")] if key[0] == "ml"]  # the Job's pod went too

    k8s.requests.clear()
    again = deploy_k8s.destroy("runyard", "ml", client)
    assert again["deleted"] == [] and again["kept"] == ["PersistentVolumeClaim/runyard-backups"]
    assert not [r for r in k8s.requests if r.method == "DELETE"]

    volumes = deploy_k8s.destroy("runyard", "ml", client, delete_volumes=True)
    assert volumes["deleted"] == ["PersistentVolumeClaim/runyard-backups"] and volumes["kept"] == []
    assert k8s.get("v1", "persistentvolumeclaims", "ml", "runyard-backups") is None


# ---- configuration and rendering -----------------------------------------------------------------------

def test_api_client_without_any_configuration_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(RunyardError, match="No usable Kubernetes configuration: no kubeconfig at .*absent"):
        deploy_k8s.api_client()
    (tmp_path / "broken").write_text("clusters: []\n")
    with pytest.raises(RunyardError, match="No usable Kubernetes configuration from the kubeconfig .*broken"):
        deploy_k8s.api_client(str(tmp_path / "broken"))


def test_api_client_uses_the_service_account_in_a_pod(k8s, tmp_path, monkeypatch):
    from kubernetes import config

    def in_cluster(client_configuration=None, **_):
        client_configuration.host = k8s.url
        client_configuration.api_key = {"BearerToken": f"Bearer {k8s.token}"}

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(config, "load_incluster_config", in_cluster)
    with pytest.raises(RunyardError, match="runyard is not deployed in namespace ml"):
        deploy_k8s.status("runyard", "ml", deploy_k8s.api_client())
    assert k8s.requests[-1].path == "/apis/apps/v1/namespaces/ml/deployments/runyard"


def test_an_unreachable_api_server_is_one_clear_error(k8s, tmp_path):
    k8s.url = "http://127.0.0.1:9"  # nothing listens there
    unreachable = deploy_k8s.api_client(str(k8s.kubeconfig(tmp_path / "unreachable")))
    with pytest.raises(RunyardError) as caught:
        deploy(settings(), unreachable)
    assert "cannot reach the Kubernetes API at http://127.0.0.1:9" in caught.value.message
    assert "nothing was changed" in caught.value.message and "\n" not in caught.value.message


def test_render_is_the_manifests_in_apply_order():
    documents = list(yaml.safe_load_all(deploy_k8s.render(settings())))
    kinds = [d["kind"] for d in documents]
    assert kinds[-2:] == ["Job", "Deployment"] and kinds[0] == "ServiceAccount"
    assert "Secret" not in kinds
