"""infra/k8s: the manifests of a runyard deployment, checked offline (no API server can run here): every
object against the Kubernetes 1.37 schemas (kubernetes-validate, strict) and through the client's typed
models, the YAML for GitOps, one policy over every pod (hardening, probes, no secret values), and what
each setting turns into."""

from __future__ import annotations

import dataclasses
import json
import re

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s

from infra.k8s import manifests
from infra.k8s.manifests import (
    CONFIG_HASH_ANNOTATION,
    NGINX_CONTAINER,
    SERVER_CONTAINER,
    build,
    selector_labels,
    to_dicts,
    to_yaml,
    upgrade_job_name,
)
from infra.k8s.settings import (
    Autoscaling,
    Ingress,
    Kerberos,
    KubernetesSettings,
    SecretRef,
    SettingsError,
)
from toolkit.certs import selfsigned
from toolkit.nginx import check

IMAGE = "registry.example.com/ml/runyard:1.4.2"
CONFIGS = {
    "postgres-secret-s3-hpa": KubernetesSettings(
        name="tracking", namespace="ml", image=IMAGE, artifacts_destination="s3://ml-artifacts/runyard",
        replicas=3, backend_store_uri_secret=SecretRef("runyard-db", "uri"),
        htpasswd_secret=SecretRef("runyard-auth", "htpasswd"),
        token_pepper_secret=SecretRef("runyard-auth", "pepper"),
        autoscaling=Autoscaling(min_replicas=3, max_replicas=8, cpu_utilization=60), env_secret="runyard-aws",
        service_account_annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/runyard"},
        create_namespace=True, image_pull_secrets=("regcred",)),
    "postgres-password-tls-ingress": KubernetesSettings(
        name="runyard", namespace="tracking", image=IMAGE, artifacts_destination="gs://ml-artifacts",
        backend_store_uri="postgresql://runyard@db.internal:5432/runyard",
        backend_store_password_secret=SecretRef("runyard-db", "password"),
        htpasswd_secret=SecretRef("runyard-auth", "htpasswd"), tls_secret="runyard-pod-tls",
        ingress=Ingress("mlflow.example.com", class_name="nginx", tls_secret="mlflow-example-tls",
                        annotations={"cert-manager.io/cluster-issuer": "letsencrypt"}),
        allowed_ingress_namespaces=("ingress-nginx", "monitoring"), allowed_hosts=("mlflow.corp.example",)),
    "sqlite-single": KubernetesSettings(
        name="runyard", namespace="default", image=IMAGE, artifacts_destination="/data/artifacts",
        replicas=1, backend_store_uri="sqlite:////data/runyard.db", auth="basic",
        htpasswd_secret=SecretRef("runyard-auth", "htpasswd"), storage_class="fast-ssd",
        data_volume_size="50Gi"),
    "hdfs-kerberos": KubernetesSettings(
        name="runyard-hdfs", namespace="ml", image="registry.example.com/runyard@sha256:" + "ab" * 32,
        artifacts_destination="hdfs://namenode.corp:9870/runyard", auth="token",
        backend_store_uri_secret=SecretRef("runyard-db", "uri"),
        token_pepper_secret=SecretRef("runyard-auth", "pepper"),
        kerberos=Kerberos(keytab=SecretRef("runyard-keytab", "runyard.keytab"), krb5_config_map="krb5",
                          principal="runyard@CORP.EXAMPLE")),
    "token-only": KubernetesSettings(
        name="runyard", namespace="ml", image=IMAGE, artifacts_destination="wasbs://c@acct.blob.core.windows.net/a",
        auth="token", backend_store_uri="mysql://runyard@mysql.ml:3306/runyard", replicas=2),
}
MODEL_PREFIX = {"v1": "V1", "v2": "V2"}
# user:password@ in anything URI-like
CREDENTIAL_IN_URI = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_ENV_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PEPPER|KEY|CREDENTIAL", re.IGNORECASE)


def docs_of(settings: KubernetesSettings) -> list[dict]:
    return to_dicts(build(settings).objects)


def model_name(doc: dict) -> str:
    return MODEL_PREFIX[doc["apiVersion"].rsplit("/", 1)[-1]] + doc["kind"]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return [d["kind"] for d in docs]


def containers(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


def options_of(args: list[str]) -> dict[str, str | bool]:
    """--option value pairs; an option followed by another option (or nothing) is a flag: True."""
    options = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[i + 1] if i + 1 < len(args) else None
            options[arg] = True if following is None or following.startswith("--") else following
    return options


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(doc: dict, container: dict) -> dict[str, dict]:
    """mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]]
            for m in container.get("volumeMounts", [])}


# --- one policy over every pod ------------------------------------------------------------------------
def policy_violations(docs: list[dict]) -> list[str]:
    """What a hardened, secret-free runyard deployment must never do; one line per violation."""
    problems = []
    text = json.dumps(docs)
    if CREDENTIAL_IN_URI.search(text):
        problems.append(f"a URI with a password: {CREDENTIAL_IN_URI.search(text).group()}")
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ServiceAccount" and doc.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        security = pod.get("securityContext", {})
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
            problems.append(f"{where}: the pod may run as root")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccomp is not RuntimeDefault")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{where}: {flag}")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: hostPath volume {volume['name']}")
            if "secret" in volume and volume["secret"].get("defaultMode", 0o644) & 0o007:
                problems.append(f"{where}: secret volume {volume['name']} is world-readable")
        for container in pod["containers"] + pod.get("initContainers", []):
            at = f"{where}/{container['name']}"
            sc = container.get("securityContext", {})
            if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
                problems.append(f"{at}: may run as root")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: root filesystem is writable")
            capabilities = sc.get("capabilities", {})
            if capabilities.get("drop") != ["ALL"] or capabilities.get("add"):
                problems.append(f"{at}: capabilities are not drop ALL")
            requests = container.get("resources", {}).get("requests", {})
            limits = container.get("resources", {}).get("limits", {})
            if not requests.get("cpu") or not requests.get("memory") or not limits.get("memory"):
                problems.append(f"{at}: missing cpu/memory requests or a memory limit")
            image = container["image"]
            tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and tag in ("", "latest"):
                problems.append(f"{at}: image {image} is not pinned")
            for env in container.get("env", []):
                value = env.get("value")
                if value is not None and SECRET_ENV_NAME.search(env["name"]) and not value.startswith("/"):
                    problems.append(f"{at}: {env['name']} holds a literal value")
        if doc["kind"] == "Deployment":
            server = containers(doc).get(SERVER_CONTAINER)
            if server is None:
                problems.append(f"{where}: no {SERVER_CONTAINER} container")
                continue
            probes = {kind: server.get(f"{kind}Probe", {}).get("httpGet", {}).get("path")
                      for kind in ("startup", "readiness", "liveness")}
            if probes != {"startup": "/health", "readiness": "/ready", "liveness": "/health"}:
                problems.append(f"{where}: server probes are {probes}")
            args = server.get("args", [])
            if "--host" not in args or args[args.index("--host") + 1] != "127.0.0.1":
                problems.append(f"{where}: the server does not listen on 127.0.0.1 only")
    return problems


@pytest.mark.parametrize("config", CONFIGS)
def test_policy_holds_for_every_config(config):
    assert policy_violations(docs_of(CONFIGS[config])) == []


@pytest.mark.parametrize("breach, expected", [
    (lambda d: d["spec"]["template"]["spec"]["containers"][1]["securityContext"].pop(
        "readOnlyRootFilesystem"), "root filesystem is writable"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(runAsUser=0),
     "may run as root"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "X", "value": "postgresql://u:hunter2@db/x"}), "a URI with a password"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "DB_PASSWORD", "value": "hunter2"}), "DB_PASSWORD holds a literal value"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][1].update(image="nginx:latest"), "is not pinned"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("memory"),
     "a memory limit"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe"), "server probes"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(2, "0.0.0.0"),
     "127.0.0.1 only"),
    (lambda d: d["spec"]["template"]["spec"]["securityContext"]["seccompProfile"].update(type="Unconfined"),
     "seccomp"),
    (lambda d: d["spec"]["template"]["spec"]["volumes"].append(
        {"name": "x", "secret": {"secretName": "x", "defaultMode": 0o644}}), "world-readable"),
    (lambda d: d["spec"]["template"]["spec"]["containers"][1]["securityContext"]["capabilities"].update(
        add=["NET_BIND_SERVICE"]), "drop ALL"),
])
def test_policy_catches_breaches(breach, expected):
    docs = docs_of(CONFIGS["token-only"])
    breach(find(docs, "Deployment"))
    assert any(expected in problem for problem in policy_violations(docs)), policy_violations(docs)


# --- valid Kubernetes, through schemas, models and YAML ----------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS)
def test_every_object_validates_and_round_trips(config):
    api = k8s.ApiClient()
    built = build(CONFIGS[config])
    docs = to_dicts(built.objects)
    assert len(docs) == len(built.supporting) + 2
    for doc, obj in zip(docs, built.objects, strict=True):
        kubernetes_validate.validate(doc, "1.37", strict=True)
        typed = api.deserialize(json.dumps(doc), model_name(doc), "application/json")
        assert type(typed) is type(obj)
        assert api.sanitize_for_serialization(typed) == doc
    assert list(yaml.safe_load_all(to_yaml(built.objects))) == docs


def test_schema_validation_is_strict():
    """The validation above would catch a typo or a wrong type."""
    deployment = find(docs_of(CONFIGS["token-only"]), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37", strict=True)


def test_yaml_is_one_document_per_object_and_keeps_nginx_conf_readable():
    built = build(CONFIGS["postgres-password-tls-ingress"])
    text = to_yaml(built.objects)
    assert text.startswith("---\n") and text.count("\n---\n") == len(built.objects) - 1
    assert [line for line in text.splitlines() if line.startswith("kind:")] == \
        [f"kind: {d['kind']}" for d in to_dicts(built.objects)]
    assert "  nginx.conf: |" in text and "\n    daemon off;\n" in text


def test_to_dicts_refuses_an_object_without_kind():
    with pytest.raises(ValueError, match="V1ConfigMap"):
        to_dicts([k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="x"))])


# --- what is built, and in which order ---------------------------------------------------------------------
@pytest.mark.parametrize("config, expected", [
    ("postgres-secret-s3-hpa", ["Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim",
                                "Service", "NetworkPolicy", "PodDisruptionBudget",
                                "HorizontalPodAutoscaler"]),
    ("postgres-password-tls-ingress", ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Service",
                                       "NetworkPolicy", "PodDisruptionBudget", "Ingress"]),
    ("sqlite-single", ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim",
                       "Service", "NetworkPolicy", "PodDisruptionBudget"]),
])
def test_apply_order(config, expected):
    built = build(CONFIGS[config])
    assert kinds(to_dicts(built.supporting)) == expected
    assert kinds(to_dicts(built.objects))[-2:] == ["Job", "Deployment"]
    assert built.objects == (*built.supporting, built.upgrade_job, built.deployment)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_object_is_labelled_and_namespaced(config):
    settings = CONFIGS[config]
    for doc in docs_of(settings):
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/name"] == "runyard"
        assert meta["labels"]["app.kubernetes.io/instance"] == settings.name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "runyard"
        assert meta["labels"]["app.kubernetes.io/component"]
        expected_version = "1.4.2" if settings.image == IMAGE else "sha256-abababababab"
        assert meta["labels"]["app.kubernetes.io/version"] == expected_version
        if doc["kind"] == "Namespace":
            assert meta["name"] == settings.namespace and "namespace" not in meta
            assert meta["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        else:
            assert meta["namespace"] == settings.namespace


def test_names_and_selectors():
    settings = CONFIGS["postgres-secret-s3-hpa"]
    docs = docs_of(settings)
    selector = {"app.kubernetes.io/name": "runyard", "app.kubernetes.io/instance": "tracking"}
    assert selector_labels(settings) == selector
    deployment, service = find(docs, "Deployment", "tracking"), find(docs, "Service", "tracking")
    assert deployment["spec"]["selector"] == {"matchLabels": selector}
    assert service["spec"]["selector"] == selector
    assert find(docs, "PodDisruptionBudget")["spec"]["selector"] == {"matchLabels": selector}
    assert find(docs, "NetworkPolicy")["spec"]["podSelector"] == {"matchLabels": selector}
    assert find(docs, "ServiceAccount", "tracking")["metadata"]["annotations"] == \
        {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/runyard"}
    # the server pods match the selector; the upgrade Job's pods never do (no Service traffic, no PDB)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    job_pod_labels = find(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= job_pod_labels.items()
    assert job_pod_labels["runyard.dev/instance"] == "tracking"
    assert job_pod_labels["app.kubernetes.io/component"] == "upgrade"


# --- the server pod ---------------------------------------------------------------------------------------
def test_server_command_listens_on_loopback_behind_nginx():
    settings = CONFIGS["postgres-secret-s3-hpa"]
    server = containers(find(docs_of(settings), "Deployment"))[SERVER_CONTAINER]
    assert "command" not in server  # the image's entrypoint (tini -- runyard) stays
    args = server["args"]
    assert args[0] == "server"
    options = options_of(args[1:])
    assert options["--host"] == "127.0.0.1" and options["--port"] == "5000" and options["--workers"] == "2"
    assert options["--trusted-proxies"] == "127.0.0.1"
    assert options["--htpasswd"] == "/etc/runyard/htpasswd/htpasswd"
    assert options["--token-pepper-file"] == "/etc/runyard/token-pepper/pepper"
    assert args[args.index("--artifacts-destination") + 1] == "s3://ml-artifacts/runyard"
    assert options["--serve-artifacts"] is True
    assert args[args.index("--allowed-hosts") + 1].split(",") == [
        "tracking", "tracking.ml", "tracking.ml.svc", "tracking.ml.svc.cluster.local"]
    assert server["envFrom"] == [{"secretRef": {"name": "runyard-aws"}}]
    assert "ports" not in server  # nothing reaches it but NGINX over loopback


@pytest.mark.parametrize("config, expected_env, password_file", [
    ("postgres-secret-s3-hpa",
     {"RUNYARD_BACKEND_STORE_URI": {"valueFrom": {"secretKeyRef": {"name": "runyard-db", "key": "uri"}}}},
     False),
    ("postgres-password-tls-ingress",
     {"RUNYARD_BACKEND_STORE_URI": {"value": "postgresql://runyard@db.internal:5432/runyard"},
      "RUNYARD_BACKEND_STORE_PASSWORD_FILE": {"value": "/etc/runyard/db-password/password"}}, True),
    ("sqlite-single", {"RUNYARD_BACKEND_STORE_URI": {"value": "sqlite:////data/runyard.db"}}, False),
])
def test_database_settings_reach_server_and_upgrade_job_alike(config, expected_env, password_file):
    docs = docs_of(CONFIGS[config])
    for doc, name in ((find(docs, "Deployment"), SERVER_CONTAINER), (find(docs, "Job"), "upgrade")):
        container = containers(doc)[name]
        env = {key: {k: v for k, v in value.items() if k != "name"}
               for key, value in env_of(container).items() if key.startswith("RUNYARD_BACKEND_STORE")}
        assert env == expected_env, name
        mounts = mounts_of(doc, container)
        if password_file:
            assert mounts["/etc/runyard/db-password"]["secret"] == {
                "secretName": "runyard-db", "items": [{"key": "password", "path": "password"}],
                "defaultMode": 0o440}
        else:
            assert "/etc/runyard/db-password" not in mounts


@pytest.mark.parametrize("config, port_name, port, scheme", [
    ("token-only", "http", 8080, "HTTP"), ("postgres-password-tls-ingress", "https", 8443, "HTTPS")])
def test_probes_and_service_go_through_nginx(config, port_name, port, scheme):
    docs = docs_of(CONFIGS[config])
    pod = containers(find(docs, "Deployment"))
    server, proxy = pod[SERVER_CONTAINER], pod[NGINX_CONTAINER]
    for kind, path in (("startup", "/health"), ("readiness", "/ready"), ("liveness", "/health")):
        get = server[f"{kind}Probe"]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, port, scheme)
        assert get["httpHeaders"] == [{"name": "Host", "value": "localhost"}]
    assert server["startupProbe"]["failureThreshold"] * server["startupProbe"]["periodSeconds"] >= 120
    assert proxy["ports"] == [{"name": port_name, "containerPort": port, "protocol": "TCP"}]
    assert proxy["readinessProbe"]["tcpSocket"] == {"port": port} == proxy["livenessProbe"]["tcpSocket"]
    assert proxy["command"] == ["nginx", "-c", "/etc/runyard/nginx/nginx.conf"]
    assert proxy["securityContext"]["runAsUser"] == 101 and server["securityContext"]["runAsUser"] == 10001
    service = find(docs, "Service")
    assert service["spec"]["ports"] == [{"name": port_name, "port": 443 if port == 8443 else 80,
                                         "targetPort": port_name, "protocol": "TCP"}]
    assert find(docs, "NetworkPolicy")["spec"]["ingress"][0]["ports"] == [{"port": port, "protocol": "TCP"}]


def test_writable_paths_are_empty_dirs():
    doc = find(docs_of(CONFIGS["token-only"]), "Deployment")
    pod = containers(doc)
    server_mounts, proxy_mounts = mounts_of(doc, pod[SERVER_CONTAINER]), mounts_of(doc, pod[NGINX_CONTAINER])
    assert server_mounts["/tmp"] == {"name": "tmp", "emptyDir": {}}
    assert proxy_mounts["/tmp"] == {"name": "nginx-tmp", "emptyDir": {}}
    assert proxy_mounts["/var/lib/runyard/nginx"] == {"name": "nginx-state", "emptyDir": {}}
    assert proxy_mounts["/etc/runyard/nginx"]["configMap"] == {"name": "runyard-nginx"}
    read_only = {m["mountPath"] for c in pod.values() for m in c["volumeMounts"] if m.get("readOnly")}
    assert read_only == {"/etc/runyard/nginx"}
    assert not any("subPath" in m for c in pod.values() for m in c["volumeMounts"])  # rotation in place


def test_nginx_config_map_is_the_sidecar_config_and_passes_nginx_check(tmp_path):
    """The ConfigMap's nginx.conf, with the pod's paths pointed at local files, passes the real nginx -t."""
    settings = CONFIGS["postgres-password-tls-ingress"]
    conf = find(docs_of(settings), "ConfigMap", "runyard-nginx")["data"]["nginx.conf"]
    for line in ("worker_processes 2;", "daemon off;", "error_log stderr warn;",
                 "access_log /dev/stdout runyard;",
                 "listen 0.0.0.0:8443 ssl http2;", "server 127.0.0.1:5000;",
                 "ssl_certificate /etc/runyard/tls/tls.crt;", "ssl_certificate_key /etc/runyard/tls/tls.key;",
                 "pid /var/lib/runyard/nginx/nginx.pid;"):
        assert line in conf, line
    assert not re.search(r"^\s*user\s", conf, re.MULTILINE)  # no user switching: nginx runs as 101 already
    material = selfsigned(tmp_path / "tls", hosts=("localhost",))
    (tmp_path / "state").mkdir()
    local = (conf.replace("/var/lib/runyard/nginx", str(tmp_path / "state"))
             .replace("/etc/runyard/tls/tls.crt", material["cert"])
             .replace("/etc/runyard/tls/tls.key", material["key"]))
    (tmp_path / "nginx.conf").write_text(local)
    assert "test is successful" in check(tmp_path / "nginx.conf")


def test_pod_hardening_and_placement():
    settings = CONFIGS["postgres-secret-s3-hpa"]
    deployment = find(docs_of(settings), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["serviceAccountName"] == "tracking" and pod["automountServiceAccountToken"] is False
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["enableServiceLinks"] is False
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 300
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["whenUnsatisfiable"] == "ScheduleAnyway" and
               c["labelSelector"] == {"matchLabels": selector_labels(settings)} for c in spread)
    assert "topologySpreadConstraints" not in find(docs_of(CONFIGS["sqlite-single"]), "Deployment")["spec"][
        "template"]["spec"]
    resources = containers(deployment)[SERVER_CONTAINER]["resources"]
    assert resources == {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
    limited = dataclasses.replace(settings, server_resources=dataclasses.replace(
        settings.server_resources, cpu_limit="2"))
    assert containers(find(docs_of(limited), "Deployment"))[SERVER_CONTAINER]["resources"]["limits"] == {
        "memory": "1Gi", "cpu": "2"}


# --- scaling, disruption, rollout ---------------------------------------------------------------------------
def test_autoscaling_owns_replicas():
    docs = docs_of(CONFIGS["postgres-secret-s3-hpa"])
    deployment = find(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA's choice, not reset by every apply
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tracking"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 8)
    assert hpa["spec"]["metrics"] == [{"type": "ContainerResource", "containerResource": {
        "container": "server", "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]
    assert find(docs_of(CONFIGS["token-only"]), "Deployment")["spec"]["replicas"] == 2
    assert "HorizontalPodAutoscaler" not in kinds(docs_of(CONFIGS["token-only"]))


@pytest.mark.parametrize("config", CONFIGS)
def test_disruption_budget_never_blocks_a_drain(config):
    pdb = find(docs_of(CONFIGS[config]), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_sqlite_is_one_pod_on_a_volume():
    settings = CONFIGS["sqlite-single"]
    docs = docs_of(settings)
    data = find(docs, "PersistentVolumeClaim", "runyard-data")
    assert data["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast-ssd",
                            "resources": {"requests": {"storage": "50Gi"}}}
    backups = find(docs, "PersistentVolumeClaim", "runyard-backups")
    assert backups["spec"]["resources"] == {"requests": {"storage": "20Gi"}}
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert mounts_of(deployment, containers(deployment)[SERVER_CONTAINER])["/data"] == {
        "name": "data", "persistentVolumeClaim": {"claimName": "runyard-data"}}
    job = find(docs, "Job")
    assert mounts_of(job, containers(job)["upgrade"])["/data"]["persistentVolumeClaim"] == {
        "claimName": "runyard-data"}
    affinity = job["spec"]["template"]["spec"]["affinity"]["podAffinity"]
    term = affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"] == {"matchLabels": selector_labels(settings)}
    # object stores: no data volume at all
    for other in ("postgres-secret-s3-hpa", "token-only"):
        claims = [d["metadata"]["name"] for d in docs_of(CONFIGS[other])
                  if d["kind"] == "PersistentVolumeClaim"]
        assert claims == [f"{CONFIGS[other].name}-backups"]


# --- network ------------------------------------------------------------------------------------------------
def test_network_policy_admits_only_the_allowed_namespaces():
    rule = find(docs_of(CONFIGS["postgres-password-tls-ingress"]), "NetworkPolicy")["spec"]
    assert rule["policyTypes"] == ["Ingress"]  # egress open: the database and stores are outside
    assert rule["ingress"][0]["from"] == [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In",
         "values": ["ingress-nginx", "monitoring"]}]}}]
    anywhere = find(docs_of(CONFIGS["token-only"]), "NetworkPolicy")["spec"]["ingress"]
    assert anywhere == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def test_ingress_routes_to_the_service():
    settings = CONFIGS["postgres-password-tls-ingress"]
    docs = docs_of(settings)
    ingress = find(docs, "Ingress", "runyard")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["mlflow.example.com"], "secretName": "mlflow-example-tls"}]
    assert ingress["spec"]["rules"] == [{"host": "mlflow.example.com", "http": {"paths": [{
        "path": "/", "pathType": "Prefix",
        "backend": {"service": {"name": "runyard", "port": {"name": "https"}}}}]}}]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    hosts = containers(find(docs, "Deployment"))[SERVER_CONTAINER]["args"]
    allowed = hosts[hosts.index("--allowed-hosts") + 1].split(",")
    assert "mlflow.example.com" in allowed and "mlflow.corp.example" in allowed
    # the user's own annotations win over our defaults
    own = dataclasses.replace(settings, ingress=dataclasses.replace(
        settings.ingress, annotations={"nginx.ingress.kubernetes.io/proxy-body-size": "5g"}))
    assert find(docs_of(own), "Ingress")["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"] == "5g"


# --- the upgrade Job --------------------------------------------------------------------------------------
def test_upgrade_job():
    settings = CONFIGS["postgres-password-tls-ingress"]
    job = find(docs_of(settings), "Job")
    assert job["metadata"]["name"] == upgrade_job_name(settings)
    assert re.fullmatch(r"runyard-upgrade-[0-9a-f]{10}", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert 3600 <= spec["activeDeadlineSeconds"] <= 24 * 3600
    assert 24 * 3600 <= spec["ttlSecondsAfterFinished"] <= 7 * 24 * 3600
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "runyard"
    upgrade = containers(job)["upgrade"]
    assert upgrade["image"] == settings.image
    # the URI comes from the env (a secretKeyRef when it holds a password), never from argv
    assert upgrade["args"][:4] == ["db", "upgrade", "--backup-to", "/backups"]
    assert not [arg for arg in upgrade["args"] if "RUNYARD_BACKEND_STORE_URI" in arg or "://" in arg]
    assert "--yes" in upgrade["args"] and "--keep" in upgrade["args"]
    assert mounts_of(job, upgrade)["/backups"] == {
        "name": "backups", "persistentVolumeClaim": {"claimName": "runyard-backups"}}
    assert upgrade["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"},
                                    "limits": {"memory": "1Gi"}}
    assert "/data" not in mounts_of(job, upgrade)  # PostgreSQL: no data volume


def test_job_name_follows_the_image_and_the_config_hash_the_nginx_config():
    settings = CONFIGS["token-only"]

    def pod_hash(s):
        return build(s).deployment.spec.template.metadata.annotations[CONFIG_HASH_ANNOTATION]

    newer = dataclasses.replace(settings, image="registry.example.com/ml/runyard:1.5.0")
    assert upgrade_job_name(newer) != upgrade_job_name(settings)
    assert upgrade_job_name(settings) == upgrade_job_name(dataclasses.replace(settings, replicas=3))
    assert pod_hash(settings) == pod_hash(newer)  # the image alone already rolls the pods
    assert re.fullmatch(r"[0-9a-f]{64}", pod_hash(settings))
    for changed in (dataclasses.replace(settings, auth="basic+token",
                                        htpasswd_secret=SecretRef("a", "htpasswd")),
                    dataclasses.replace(settings, tls_secret="runyard-tls")):
        assert pod_hash(changed) != pod_hash(settings)
        configs = [find(docs_of(s), "ConfigMap")["data"]["nginx.conf"] for s in (settings, changed)]
        assert configs[0] != configs[1]


def test_version_label():
    assert manifests.version_label("localhost:5000/runyard:1.2.3") == "1.2.3"
    assert manifests.version_label("r.example.com/runyard:2.0@sha256:" + "cd" * 32) == "2.0"
    assert manifests.version_label("runyard@sha256:" + "0123456789" * 7) == "sha256-012345678901"


# --- Kerberos ----------------------------------------------------------------------------------------------
def test_kerberos_keytab_krb5_conf_and_cache():
    doc = find(docs_of(CONFIGS["hdfs-kerberos"]), "Deployment")
    server = containers(doc)[SERVER_CONTAINER]
    env = {name: e.get("value") for name, e in env_of(server).items()}
    assert env["RUNYARD_KERBEROS_KEYTAB"] == "/etc/runyard/kerberos/keytab"
    assert env["RUNYARD_KERBEROS_PRINCIPAL"] == "runyard@CORP.EXAMPLE"
    assert env["KRB5_CONFIG"] == "/etc/runyard/krb5/krb5.conf"
    assert env["KRB5CCNAME"].startswith("FILE:/run/krb5/")
    mounts = mounts_of(doc, server)
    assert mounts["/etc/runyard/kerberos"]["secret"] == {
        "secretName": "runyard-keytab", "items": [{"key": "runyard.keytab", "path": "keytab"}],
        "defaultMode": 0o440}  # not world-readable; the server's group (fsGroup) reads root's file
    assert mounts["/etc/runyard/krb5"]["configMap"] == {
        "name": "krb5", "items": [{"key": "krb5.conf", "path": "krb5.conf"}]}
    assert mounts["/run/krb5"]["emptyDir"] == {}
    read_only = {m["mountPath"] for m in server["volumeMounts"] if m.get("readOnly")}
    assert {"/etc/runyard/kerberos", "/etc/runyard/krb5"} <= read_only and "/run/krb5" not in read_only
    for other in ("token-only", "postgres-secret-s3-hpa"):
        server = containers(find(docs_of(CONFIGS[other]), "Deployment"))[SERVER_CONTAINER]
        assert "RUNYARD_KERBEROS_KEYTAB" not in env_of(server)


# --- settings refused before anything is built ------------------------------------------------------------
BASE = CONFIGS["token-only"]
SQLITE = CONFIGS["sqlite-single"]


@pytest.mark.parametrize("base, overrides, message", [
    (SQLITE, {"replicas": 2}, "SQLite lives on one ReadWriteOnce volume"),
    (SQLITE, {"autoscaling": Autoscaling(1, 3)}, "SQLite lives on one ReadWriteOnce volume"),
    (BASE, {"artifacts_destination": "/data/artifacts"}, "A local --artifacts-destination"),
    (BASE, {"auth": "basic"}, "needs htpasswd_secret"),
    (BASE, {"auth": "basic+token"}, "needs htpasswd_secret"),
    (BASE, {"name": "Runyard"}, "--name: 'Runyard' is not a valid name"),
    (BASE, {"name": "r" * 41}, "at most 40 characters"),
    (BASE, {"name": "1runyard"}, "starting with a letter"),
    (BASE, {"namespace": "ml_team"}, "--namespace"),
    (BASE, {"image": "registry.example.com/runyard"}, "has no fixed tag"),
    (BASE, {"image": "registry.example.com/runyard:latest"}, "never :latest"),
    (BASE, {"image": "localhost:5000/runyard"}, "has no fixed tag"),
    (BASE, {"nginx_image": "nginxinc/nginx-unprivileged"}, "nginx_image"),
    (BASE, {"backend_store_uri": "mysql://runyard:hunter2@mysql/runyard"}, "holds a password"),
    (BASE, {"backend_store_uri_secret": SecretRef("db", "uri")}, "exactly one"),
    (BASE, {"kerberos": Kerberos(SecretRef("kt", "keytab"), "krb5", "r@EXAMPLE")}, "only used with an hdfs://"),
    (BASE, {"allowed_hosts": ("Mlflow.Example.com",)}, "allowed_hosts"),
    (BASE, {"allowed_hosts": ("a.example,b.example",)}, "allowed_hosts"),
])
def test_bad_settings_are_refused_with_a_clear_message(base, overrides, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        dataclasses.replace(base, **overrides)
