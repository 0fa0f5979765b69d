"""toolkit/deploy/config.py: KubernetesSettings from runyard.yaml and flags."""

from __future__ import annotations

import textwrap

import pytest

from infra.k8s.settings import Autoscaling, Ingress, Kerberos, Resources, SecretRef
from server.errors import RunyardError
from toolkit.deploy.config import load_kubernetes_settings

BASE = """\
kubernetes:
  name: runyard
  namespace: ml
  image: ghcr.io/acme/runyard:1.4.2
  artifacts_destination: s3://ml-artifacts/runyard
  backend_store_uri_secret: runyard-db/uri
  htpasswd_secret: runyard-auth/htpasswd
"""


def write(tmp_path, text: str, extra: str = "", after: str = "") -> str:
    """runyard.yaml: `text`, then `extra` inside its kubernetes: section, then `after` at the top level."""
    path = tmp_path / "runyard.yaml"
    path.write_text(text + textwrap.indent(textwrap.dedent(extra), "  ") + after)
    return str(path)


def error(flags: dict, config_file: str | None) -> str:
    with pytest.raises(RunyardError) as caught:
        load_kubernetes_settings(flags, config_file)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    return caught.value.message


def test_the_file_with_nested_sections(tmp_path):
    config = write(tmp_path, BASE, after="aws: {region: eu-west-1}\n", extra="""\
        replicas: 3
        create_namespace: true
        image_pull_secrets: [regcred]
        service_account_annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::1:role/runyard"}
        server_resources: {memory_limit: 2Gi, cpu_request: 1}
        autoscaling: {min_replicas: 2, max_replicas: 6}
        ingress:
          host: mlflow.example.com
          class_name: nginx
          annotations: {cert-manager.io/cluster-issuer: letsencrypt}
        """)
    settings = load_kubernetes_settings({}, config)
    assert (settings.name, settings.namespace, settings.replicas) == ("runyard", "ml", 3)
    assert settings.create_namespace is True and settings.image_pull_secrets == ("regcred",)
    assert settings.backend_store_uri_secret == SecretRef("runyard-db", "uri")
    assert settings.htpasswd_secret == SecretRef("runyard-auth", "htpasswd")
    assert settings.server_resources == Resources("1", "512Mi", None, "2Gi")  # the rest keeps its defaults
    assert settings.autoscaling == Autoscaling(2, 6, 70)
    assert settings.ingress == Ingress("mlflow.example.com", "nginx", None,
                                       {"cert-manager.io/cluster-issuer": "letsencrypt"})
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/runyard"}
    assert settings.service_account_annotations == role


def test_flags_override_the_file_and_none_flags_do_not(tmp_path):
    config = write(tmp_path, BASE, "ingress: {host: old.example.com, class_name: nginx}\n")
    settings = load_kubernetes_settings(
        {"image": "ghcr.io/acme/runyard:1.5.0", "replicas": None, "namespace": None,
         "ingress.host": "mlflow.example.com", "workers": 4}, config)
    assert settings.image == "ghcr.io/acme/runyard:1.5.0" and settings.workers == 4
    assert settings.namespace == "ml" and settings.replicas == 2  # from the file, and the default
    assert settings.ingress == Ingress("mlflow.example.com", "nginx")  # merged key by key


def test_flags_alone_and_kerberos(tmp_path):
    settings = load_kubernetes_settings({
        "name": "ry", "namespace": "data", "image": "registry.local/runyard@sha256:" + "a" * 64,
        "artifacts_destination": "hdfs://namenode:9870/runyard", "auth": "token",
        "backend_store_uri": "postgresql://runyard@db/runyard",
        "kerberos": {"keytab": "runyard-keytab/keytab", "krb5_config_map": "krb5",
                     "principal": "runyard@EXAMPLE.COM"}}, None)
    assert settings.kerberos == Kerberos(SecretRef("runyard-keytab", "keytab"), "krb5", "runyard@EXAMPLE.COM")
    assert settings.dialect == "postgresql"


@pytest.mark.parametrize("extra, named, hint", [
    ("imagee: x\n", "kubernetes.imagee in ", "did you mean image?"),
    ("ingress: {host: a.example.com, hostname: b}\n", "kubernetes.ingress.hostname in ", "ingress.host?"),
    ("server_resources: {zzz: 1Gi}\n", "kubernetes.server_resources.zzz in ", "cpu_request, memory_request"),
])
def test_unknown_keys_are_errors_naming_the_key_and_the_file(tmp_path, extra, named, hint):
    config = write(tmp_path, BASE, extra)
    message = error({}, config)
    assert "Unknown setting" in message and named + config in message and hint in message


def test_unknown_sections_and_unknown_flags(tmp_path):
    config = write(tmp_path, BASE, after="kubernets: {}\n")
    assert "unknown section 'kubernets'" in error({}, config) and config in error({}, config)
    assert "Unknown setting --replica" in error({"replica": 3}, write(tmp_path, BASE))


@pytest.mark.parametrize("extra, flags, expected", [
    ("replicas: two\n", {}, "kubernetes.replicas in {file}: expected a whole number, got str 'two'"),
    ("replicas: true\n", {}, "kubernetes.replicas in {file}: expected a whole number"),
    ("create_namespace: 'yes'\n", {}, "kubernetes.create_namespace in {file}: expected true or false"),
    ("image_pull_secrets: regcred\n", {}, "kubernetes.image_pull_secrets in {file}: expected a list"),
    ("ingress: {host: a.example.com, annotations: {x: 1}}\n", {}, "kubernetes.ingress.annotations in {file}"),
    ("autoscaling: 3\n", {}, "kubernetes.autoscaling in {file}: expected a mapping of settings"),
    ("", {"replicas": "3"}, "Setting --replicas: expected a whole number, got str '3'"),
    ("", {"ingress.host": 5}, "Setting --ingress-host: expected text"),
])
def test_wrong_types_name_the_key_and_where_it_came_from(tmp_path, extra, flags, expected):
    config = write(tmp_path, BASE, extra)
    assert expected.format(file=config) in error(flags, config)


def test_settings_errors_pass_through(tmp_path):
    config = write(tmp_path, BASE)
    assert "never :latest" in error({"image": "ghcr.io/acme/runyard:latest"}, config)
    assert "is not SECRET/KEY" in error({"htpasswd_secret": "runyard-auth"}, config)
    assert "ReadWriteOnce" in error({"backend_store_uri_secret": None, "artifacts_destination": "/data/a",
                                     "replicas": 2}, config)


def test_missing_settings_unreadable_files_and_bad_yaml(tmp_path):
    message = error({"name": "runyard"}, None)
    assert "Missing settings: namespace, image, artifacts_destination" in message
    assert "ingress.host" in error({"ingress": {"class_name": "nginx"}}, write(tmp_path, BASE))
    assert "Cannot read" in error({}, str(tmp_path / "absent.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("kubernetes:\n  name: [runyard\n")
    message = error({}, str(broken))
    assert str(broken) in message and "not valid YAML" in message and "line" in message
    top = tmp_path / "list.yaml"
    top.write_text("- kubernetes\n")
    assert "expected a mapping" in error({}, str(top))
