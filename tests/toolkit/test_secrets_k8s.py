"""toolkit/secrets.py: k8s://<namespace>/<secret-name>#<key> through the official kubernetes client,
against a recorded-API test double of the API server (tests/helpers/k8s_api.py; no API server runs here)."""

from __future__ import annotations

import base64
import logging
import sys

import pytest
from helpers.k8s_api import fake_kubernetes

from server.errors import RunyardError
from toolkit import tokens
from toolkit.rotation.credentials import rotate_token
from toolkit.secrets import KubernetesSecret, open_secret

VALUE = "s3cr3t-Value_with.symbols+/=\nand a second line"
B64 = base64.b64encode(VALUE.encode()).decode()


@pytest.fixture
def k8s(tmp_path, monkeypatch):
    with fake_kubernetes() as api:
        api.namespaces.add("ci")
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
        yield api


def _no_value_in(text: str) -> None:
    assert VALUE not in text and B64 not in text and "s3cr3t" not in text


# ---- references ---------------------------------------------------------------------------------------

def test_k8s_references_parse():
    secret = open_secret("k8s://ci/runyard-db#password")
    assert isinstance(secret, KubernetesSecret)
    assert (secret.namespace, secret.name, secret.key, secret.ref) == (
        "ci", "runyard-db", "password", "k8s://ci/runyard-db#password")
    assert open_secret("K8S://ci/a.b#tls.key").key == "tls.key"


@pytest.mark.parametrize("ref", ["k8s://ci/runyard-db", "k8s://ci#password", "k8s://ci/runyard-db/password",
                                 "k8s://Ci/db#password", "k8s://ci/db#pass word", "k8s://ci/db#", "k8s://",
                                 "k8s://ci/db?x=1#password"])
def test_bad_k8s_references_are_clear_errors(ref):
    with pytest.raises(RunyardError) as caught:
        open_secret(ref)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "k8s://<namespace>/<secret-name>#<key>" in caught.value.message


def test_unknown_scheme_lists_k8s():
    with pytest.raises(RunyardError, match=r"k8s://<namespace>/<secret-name>#<key>"):
        open_secret("vault://x")


# ---- reading and writing ------------------------------------------------------------------------------

def test_read_write_create_then_patch_one_key(k8s, caplog):
    caplog.set_level(logging.DEBUG)
    secret = open_secret("k8s://ci/runyard#password")
    assert secret.read() is None  # no Secret yet

    secret.write(VALUE)  # creates it: Opaque, the one key
    stored = k8s.secrets[("ci", "runyard")]
    assert stored["type"] == "Opaque" and stored["data"] == {"password": B64}
    assert secret.read() == VALUE

    k8s.secrets[("ci", "runyard")]["data"]["username"] = base64.b64encode(b"robot").decode()
    other = open_secret("k8s://ci/runyard#token")
    assert other.read() is None  # the Secret exists, the key does not
    secret.write("second")
    assert k8s.data("ci", "runyard") == {"password": "second", "username": "robot"}
    other.write("tok")
    assert k8s.data("ci", "runyard") == {"password": "second", "username": "robot", "token": "tok"}
    assert secret.read() == "second" and other.read() == "tok"

    patches = [r for r in k8s.requests if r.method == "PATCH"]
    assert patches and all(r.content_type == "application/merge-patch+json" for r in patches)
    assert patches[-1].body == {"data": {"token": base64.b64encode(b"tok").decode()}}  # only its key
    assert all(r.path.startswith("/api/v1/namespaces/ci/secrets") for r in k8s.requests)
    _no_value_in(caplog.text)


def test_wrong_token_is_an_error_naming_the_ref_not_the_value(k8s, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    k8s.put("ci", "runyard", {"password": VALUE})
    monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path / "wrong", token="not-the-token")))
    secret = open_secret("k8s://ci/runyard#password")
    for action in (secret.read, lambda: secret.write(VALUE)):
        with pytest.raises(RunyardError) as caught:
            action()
        assert caught.value.error_code == "PERMISSION_DENIED"
        assert "k8s://ci/runyard#password" in caught.value.message and "401" in caught.value.message
        _no_value_in(caught.value.message)
    assert k8s.data("ci", "runyard") == {"password": VALUE}
    _no_value_in(caplog.text)


def test_forbidden_missing_namespace_and_unreachable_api(k8s, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    k8s.forbidden.add("prod")
    with pytest.raises(RunyardError) as caught:
        open_secret("k8s://prod/runyard#password").write(VALUE)
    assert caught.value.error_code == "PERMISSION_DENIED"
    assert "k8s://prod/runyard#password" in caught.value.message and "403" in caught.value.message
    assert "forbidden" in caught.value.message
    _no_value_in(caught.value.message)

    with pytest.raises(RunyardError) as caught:
        open_secret("k8s://nowhere/runyard#password").write(VALUE)
    assert caught.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert 'namespaces "nowhere" not found' in caught.value.message
    assert "k8s://nowhere/runyard#password" in caught.value.message
    _no_value_in(caught.value.message)

    k8s.url = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path / "unreachable")))
    with pytest.raises(RunyardError) as caught:
        open_secret("k8s://ci/runyard#password").write(VALUE)
    assert "cannot reach the Kubernetes API at http://127.0.0.1:9" in caught.value.message
    assert "k8s://ci/runyard#password" in caught.value.message
    _no_value_in(caught.value.message)
    _no_value_in(caplog.text)


def test_no_kubeconfig_and_no_client_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(RunyardError, match=r"k8s://ci/x#k: no usable Kubernetes configuration"):
        open_secret("k8s://ci/x#k").read()
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if not installed
    with pytest.raises(RunyardError, match=r"pip install 'runyard\[kubernetes\]'"):
        open_secret("k8s://ci/x#k").read()


def test_in_cluster_config_is_used_in_a_pod(k8s, monkeypatch):
    from kubernetes import config

    calls = []

    def incluster(client_configuration=None, **_):
        calls.append(True)
        client_configuration.host = k8s.url
        client_configuration.api_key = {"BearerToken": f"Bearer {k8s.token}"}

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setattr(config, "load_incluster_config", incluster)
    monkeypatch.setattr(config, "load_kube_config", lambda *a, **k: pytest.fail("kubeconfig used in a pod"))
    open_secret("k8s://ci/runyard#password").write("pod")
    assert calls and k8s.data("ci", "runyard") == {"password": "pod"}


# ---- end to end: token rotation into a Kubernetes Secret ----------------------------------------------

def test_rotate_token_into_a_kubernetes_secret(k8s, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    uri = str(tmp_path / "store")
    old_token, _ = tokens.create(uri, "runyard", None, None, None)
    k8s.put("ci", "runyard", {"other": "kept"})

    report = rotate_token(uri, "runyard", 60, to="k8s://ci/runyard#token")

    new_token = k8s.data("ci", "runyard")["token"]
    assert k8s.data("ci", "runyard")["other"] == "kept"
    assert new_token and new_token != old_token
    assert open_secret("k8s://ci/runyard#token").read() == new_token
    with tokens.open_store(uri, None) as store:
        assert store.authenticate(new_token) is not None
        assert store.authenticate(new_token) == store.authenticate(old_token)  # same user, overlap
    assert new_token not in repr(report) and "token" not in report
    assert new_token not in caplog.text
