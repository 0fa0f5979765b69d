"""`runyard deploy …` as operators run it: the CLI in a subprocess, against the recorded Kubernetes API double
(tests/helpers/k8s_api.py) and, for AWS, this machine as it is (no Pulumi CLI can be installed here)."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
import yaml
from helpers.cli import run_cli
from helpers.k8s_api import fake_kubernetes

IMAGE = "ghcr.io/acme/runyard:1.4.2"
DB_URI = "postgresql://runyard:Db-Pa55word-7@db.internal:5432/runyard"
FLAGS = ("--name", "runyard", "--namespace", "ml", "--image", IMAGE, "--replicas", "3",
         "--backend-store-uri-secret", "runyard-db/uri", "--artifacts-destination", "s3://ml/artifacts",
         "--htpasswd-secret", "runyard-auth/htpasswd")


def one_error_line(result, *must_contain: str) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error: "), result.stderr
    for text in must_contain:
        assert text in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    with fake_kubernetes() as api:
        api.namespaces.add("ml")
        api.put("ml", "runyard-db", {"uri": DB_URI})
        api.put("ml", "runyard-auth", {"htpasswd": "alice:$2y$12$abcdefghijklmnopqrstuv"})
        api.script.job_reads = api.script.rollout_reads = 0  # the CLI polls every 2 s
        api.kubeconfig_path = str(api.kubeconfig(tmp_path / "kubeconfig"))
        yield api


def test_dry_run_prints_valid_manifests_and_needs_no_cluster():
    result = run_cli("deploy", "kubernetes", *FLAGS, "--dry-run", env={"KUBECONFIG": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    kinds = [doc["kind"] for doc in documents]
    assert kinds[-2:] == ["Job", "Deployment"] and "Service" in kinds and "ConfigMap" in kinds
    for doc in documents:
        kubernetes_validate.validate(doc, "1.37", strict=True)
    assert "Db-Pa55word" not in result.stdout  # only the Secret's name and key are in the manifests


def test_settings_from_runyard_yaml_with_flags_winning(tmp_path):
    config = tmp_path / "runyard.yaml"
    config.write_text(yaml.safe_dump({"kubernetes": {
        "name": "runyard", "namespace": "ml", "image": "ghcr.io/acme/runyard:1.0.0", "replicas": 2,
        "backend_store_uri_secret": "runyard-db/uri", "artifacts_destination": "s3://ml/artifacts",
        "auth": "token", "autoscaling": {"min_replicas": 2, "max_replicas": 6}}}))
    result = run_cli("deploy", "kubernetes", "--config", str(config), "--image", IMAGE, "--dry-run")
    assert result.returncode == 0, result.stderr
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert documents["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 6

    config.write_text(yaml.safe_dump({"kubernetes": {"name": "runyard", "imagee": IMAGE}}))
    one_error_line(run_cli("deploy", "kubernetes", "--config", str(config), "--dry-run"), "imagee",
                   "did you mean image")


@pytest.mark.parametrize(("flags", "reason"), [
    (("--backend-store-uri", "sqlite:////data/mlflow.db", "--artifacts-destination", "/data/artifacts",
      "--replicas", "2"), "one server pod"),
    (("--backend-store-uri", f"{DB_URI}", "--artifacts-destination", "s3://ml/a"), "holds a password"),
    (("--name", "Runyard_1", "--backend-store-uri-secret", "runyard-db/uri"), "not a valid name"),
    (("--backend-store-uri-secret", "runyard-db"), "SECRET/KEY"),
])
def test_bad_settings_are_refused_before_any_request(cluster, flags, reason):
    base = {"--name": "runyard", "--namespace": "ml", "--image": IMAGE, "--artifacts-destination": "s3://ml/a",
            "--auth": "token"}
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    argv = [item for pair in {**base, **given}.items() for item in pair]
    result = run_cli("deploy", "kubernetes", *argv, "--kubeconfig", cluster.kubeconfig_path)
    stderr = one_error_line(result, reason)
    assert "Db-Pa55word" not in stderr + result.stdout
    assert cluster.requests == []  # refused before the cluster was asked anything


def test_missing_secrets_are_listed_and_nothing_is_written(cluster):
    result = run_cli("deploy", "kubernetes", *FLAGS, "--token-pepper-secret", "runyard-pepper/pepper",
                     "--tls-secret", "runyard-tls", "--kubeconfig", cluster.kubeconfig_path)
    stderr = one_error_line(result, "runyard-pepper", "runyard-tls")
    assert "Db-Pa55word" not in stderr
    assert [r for r in cluster.requests if r.method != "GET"] == []


def test_deploy_status_destroy_round_trip(cluster):
    deployed = run_cli("deploy", "kubernetes", *FLAGS, "--kubeconfig", cluster.kubeconfig_path, "--json")
    assert deployed.returncode == 0, deployed.stderr
    report = json.loads(deployed.stdout)
    assert report["image"] == IMAGE and report["previous_image"] is None
    assert report["upgrade_job"]["ran"] is True and report["ready"]["status"] == "ready"
    assert "preflight: ok" in deployed.stderr  # progress goes to stderr, the report alone to stdout
    assert "Db-Pa55word" not in deployed.stdout + deployed.stderr

    status = run_cli("deploy", "kubernetes", "status", "--name", "runyard", "--namespace", "ml",
                     "--kubeconfig", cluster.kubeconfig_path)
    assert status.returncode == 0, status.stderr
    assert IMAGE in status.stdout and "3/3 ready" in status.stdout

    cluster.script.ready_status = 503
    failing = {"ok": False, "error": "connection refused"}
    cluster.script.ready_body = {"status": "not_ready", "checks": {"database": failing}}
    degraded = run_cli("deploy", "kubernetes", "status", "--name", "runyard", "--namespace", "ml",
                       "--kubeconfig", cluster.kubeconfig_path, "--json")
    assert degraded.returncode == 1 and json.loads(degraded.stdout)["ok"] is False

    refused = run_cli("deploy", "kubernetes", "destroy", "--name", "runyard", "--namespace", "ml",
                      "--kubeconfig", cluster.kubeconfig_path)
    one_error_line(refused, "--yes")
    assert cluster.get("apps/v1", "deployments", "ml", "runyard") is not None

    destroyed = run_cli("deploy", "kubernetes", "destroy", "--name", "runyard", "--namespace", "ml",
                        "--kubeconfig", cluster.kubeconfig_path, "--yes")
    assert destroyed.returncode == 0, destroyed.stderr
    assert "deleted  Deployment/runyard" in destroyed.stdout
    assert "kept     PersistentVolumeClaim/runyard-backups" in destroyed.stdout
    assert cluster.get("apps/v1", "deployments", "ml", "runyard") is None
    assert cluster.data("ml", "runyard-db") == {"uri": DB_URI}  # Secrets belong to the operator


def test_failed_upgrade_job_exits_nonzero_and_names_the_running_version(cluster):
    first = run_cli("deploy", "kubernetes", *FLAGS, "--kubeconfig", cluster.kubeconfig_path)
    assert first.returncode == 0, first.stderr
    cluster.script.job_outcome = "failed"
    cluster.script.job_log = "ERROR could not lock the database\n"
    newer = [arg if arg != IMAGE else "ghcr.io/acme/runyard:1.5.0" for arg in FLAGS]
    result = run_cli("deploy", "kubernetes", *newer, "--kubeconfig", cluster.kubeconfig_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not lock the database" in result.stderr and IMAGE in result.stderr
    pod = cluster.get("apps/v1", "deployments", "ml", "runyard")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == IMAGE


def test_deploy_aws_says_what_is_missing(tmp_path):
    config = tmp_path / "runyard.yaml"
    config.write_text(yaml.safe_dump({"aws": {
        "name": "runyard-prod", "region": "eu-west-1", "vpc_id": "vpc-0123456789abcdef0",
        "private_subnet_ids": ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]}}))
    # No Pulumi CLI can be installed on this machine: the refusal is the real one.
    no_cli = run_cli("deploy", "aws", "preview", "--config", str(config),
                     env={"PATH": "/usr/bin:/bin", "PULUMI_HOME": str(tmp_path / "pulumi"),
                          "HOME": str(tmp_path)})
    one_error_line(no_cli, "Pulumi CLI is not installed", "https://www.pulumi.com/docs/install/")

    one_subnet = run_cli("deploy", "aws", "preview", "--config", str(config),
                         "--subnet", "subnet-0123456789abcdef0")
    one_error_line(one_subnet, "private_subnet_ids")
    unknown = tmp_path / "typo.yaml"
    unknown.write_text(yaml.safe_dump({"aws": {"name": "runyard-prod", "regoin": "eu-west-1"}}))
    one_error_line(run_cli("deploy", "aws", "up", "--config", str(unknown)), "regoin")
