"""`runyard rotate tls` (toolkit/rotation/tls.py) against a real NGINX in front of a real `runyard server`:
under steady load from 4 client threads (trusting the old and the new CA) and with an upload in flight, the
certificate is replaced with a graceful reload and no request fails; afterwards only the new certificate is
served. A pair that cannot work is refused before anything is installed; one that `nginx -t` rejects, or
that is not what clients then see, is undone (old files back, NGINX reloaded again)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import shutil
import threading
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from helpers.ports import wait_for
from helpers.rotation import API, Load, bearer, start_gateway

from server.errors import RunyardError
from toolkit import certs, tokens
from toolkit.rotation import tls
from toolkit.rotation.credentials import rotate_token
from toolkit.rotation.tls import rotate_tls


@pytest.fixture
def pki(tmp_path):
    """The certificate NGINX serves now (first CA) and a new one (second CA), both for localhost, and a
    CA bundle trusting both, as clients have it during a CA change."""
    old = certs.selfsigned(tmp_path / "old-ca")
    new = certs.selfsigned(tmp_path / "new-ca")
    installed = tmp_path / "installed"
    installed.mkdir()
    shutil.copy(old["cert"], installed / "cert.pem")
    shutil.copy(old["key"], installed / "key.pem")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(Path(old["ca"]).read_bytes() + Path(new["ca"]).read_bytes())
    return {"old": old, "new": new, "cert": str(installed / "cert.pem"), "key": str(installed / "key.pem"),
            "bundle": str(bundle), "dir": tmp_path}


@pytest.fixture
def tls_gateway(server_factory, tmp_path, pki):
    server = server_factory(None, "--trusted-proxies", "127.0.0.1")
    gw = start_gateway(tmp_path, server, auth="token", tls=(pki["cert"], pki["key"]))
    yield gw
    gw.nginx.stop()


def _fingerprint(path: str) -> str:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return tls.fingerprint(cert.public_bytes(serialization.Encoding.DER))


def _served(gw) -> str:
    host, port = gw.url.removeprefix("https://").split(":")
    return tls.served_fingerprint(host, int(port))


def _key_lines(path: str) -> list[str]:
    """The base64 lines of a PEM key: none may appear in a report or a message."""
    return [line for line in Path(path).read_text().splitlines() if line and not line.startswith("-----")]


def _leaf(ca_dir: Path, out: Path, key=None, days: int = 30, hosts=("localhost",), expired: bool = False
          ) -> tuple[str, str]:
    """A server certificate signed by the CA in `ca_dir`, with `key` (default a new P-256 key)."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired else \
        (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(exist_ok=True)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


class SlowUpload:
    """An artifact upload through NGINX that sends half its body, waits for `resume`, then the rest: it
    is in flight across the reload."""

    CHUNK, CHUNKS = 64 * 1024, 32

    def __init__(self, url: str, token: str, verify: str):
        self.url, self.token, self.verify = url, token, verify
        self.halfway, self.resume = threading.Event(), threading.Event()
        self.data = hashlib.sha256(b"seed").digest() * (self.CHUNK * self.CHUNKS // 32)
        self.status: int | str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _body(self):
        for i in range(self.CHUNKS):
            if i == self.CHUNKS // 2:
                self.halfway.set()
                self.resume.wait(120)
            yield self.data[i * self.CHUNK:(i + 1) * self.CHUNK]

    def _run(self):
        try:
            answer = requests.put(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/rotation/blob.bin",
                                  data=self._body(), auth=bearer(self.token), verify=self.verify, timeout=300)
            self.status = answer.status_code
        except requests.RequestException as exc:
            self.status = f"{type(exc).__name__}: {exc}"


def test_tls_rotation_under_load_fails_no_request(tls_gateway, pki, tmp_path):
    gw = tls_gateway
    uri = gw.server.backend_uri
    token, _ = tokens.create(uri, "load", "robot", None, None)
    secret = tmp_path / "token"
    secret.write_text(token)
    experiment = requests.post(f"{gw.server.url}{API}/experiments/create", json={"name": "tls"}, timeout=30)
    old_fingerprint, new_fingerprint = _fingerprint(pki["cert"]), _fingerprint(pki["new"]["cert"])
    assert _served(gw) == old_fingerprint
    workers_before = gw.nginx.workers()

    load = Load(gw.url, experiment.json()["experiment_id"], bearer, secret, verify=pki["bundle"]).start()
    upload = SlowUpload(gw.url, token, pki["bundle"])
    upload.thread.start()
    assert upload.halfway.wait(60)
    load.wait_for_requests(20)

    report = rotate_tls(pki["new"]["cert"], pki["new"]["key"], pki["cert"], pki["key"], str(gw.pid_file),
                        check_url=gw.url)

    assert _served(gw) == new_fingerprint
    load.wait_for_requests(20)  # and traffic goes on, now on the new certificate
    upload.resume.set()
    upload.thread.join(120)
    tally = load.stop()
    assert tally.failures == []
    assert upload.status == 200  # in flight through the reload, finished by the old worker
    stored = requests.get(f"{gw.server.url}/api/2.0/mlflow-artifacts/artifacts/rotation/blob.bin", timeout=60)
    assert stored.status_code == 200 and stored.content == upload.data
    load.check_history(gw.server)

    assert report["verified"] == ["pair", "nginx -t", "reload", "handshake"]
    assert report["old_fingerprint_sha256"] == old_fingerprint
    assert report["new_fingerprint_sha256"] == new_fingerprint
    assert report["hosts"] == ["localhost", "127.0.0.1"] and report["nginx_conf"] == str(gw.conf)
    # A reload: new workers; the old ones leave once they have finished what they held (the upload).
    assert wait_for(lambda: not workers_before & gw.nginx.workers(), timeout=30)
    text = json.dumps(report)
    assert not any(line in text for line in _key_lines(pki["new"]["key"]) + _key_lines(pki["old"]["key"]))

    # Installed: the new files (key 0600), the old ones kept aside.
    assert Path(pki["cert"]).read_bytes() == Path(pki["new"]["cert"]).read_bytes()
    assert Path(pki["key"]).read_bytes() == Path(pki["new"]["key"]).read_bytes()
    assert Path(pki["key"]).stat().st_mode & 0o777 == 0o600
    assert Path(report["previous_cert"]).read_bytes() == Path(pki["old"]["cert"]).read_bytes()
    assert Path(report["previous_key"]).read_bytes() == Path(pki["old"]["key"]).read_bytes()
    assert Path(report["previous_key"]).stat().st_mode & 0o777 == 0o600

    # The old certificate is no longer served: a client trusting only the old CA is refused.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{gw.url}/health", verify=pki["old"]["ca"], timeout=30)
    assert requests.get(f"{gw.url}/health", verify=pki["new"]["ca"], timeout=30).status_code == 200
    print(f"\nTLS rotation: {tally.ok} requests ok, {tally.reconnects} sent again on a new connection after "
          f"NGINX closed an idle keep-alive one, {len(tally.failures)} failed; upload in flight: "
          f"{upload.status}")


def test_a_pair_that_cannot_work_is_refused_before_anything_is_installed(tls_gateway, pki):
    gw = tls_gateway
    d = pki["dir"]
    old_ca, new_ca = d / "old-ca", d / "new-ca"
    other = certs.selfsigned(d / "other-ca", hosts=("other.example",))
    expired = _leaf(new_ca, d / "expired", expired=True)
    encrypted = d / "encrypted-key.pem"
    key = serialization.load_pem_private_key(Path(pki["new"]["key"]).read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    garbage = d / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        "key of another certificate": (pki["new"]["cert"], pki["old"]["key"], "is not the key of"),
        "expired": (*expired, "expired on"),
        "another host": (other["cert"], other["key"], "does not cover localhost"),
        "encrypted key": (pki["new"]["cert"], str(encrypted), "encrypted key"),
        "not a certificate": (str(garbage), pki["new"]["key"], "holds no PEM certificate"),
        "not a key": (pki["new"]["cert"], str(garbage), "holds no PEM private key"),
        "missing": (str(d / "absent.pem"), pki["new"]["key"], "does not exist"),
    }
    before = (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes())
    workers = gw.nginx.workers()
    secret_lines = _key_lines(pki["new"]["key"]) + _key_lines(pki["old"]["key"])
    for name, (cert, key_path, expected) in cases.items():
        with pytest.raises(RunyardError) as raised:
            rotate_tls(cert, key_path, pki["cert"], pki["key"], str(gw.pid_file), check_url=gw.url)
        assert expected in raised.value.message, name
        assert not any(line in raised.value.message for line in secret_lines), name
        assert (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes()) == before, name
        assert not list(Path(pki["cert"]).parent.glob("*.previous")), name
    assert gw.nginx.workers() == workers  # never reloaded
    assert _served(gw) == _fingerprint(pki["cert"])
    assert old_ca.is_dir() and new_ca.is_dir()

    # Neither is a pid file that names no NGINX master (a stale one could name any process).
    stale = d / "stale.pid"
    stale.write_text("1\n")
    with pytest.raises(RunyardError) as raised:
        rotate_tls(pki["new"]["cert"], pki["new"]["key"], pki["cert"], pki["key"], str(stale))
    assert "not an NGINX master" in raised.value.message
    with pytest.raises(RunyardError) as raised:
        rotate_tls(pki["new"]["cert"], pki["new"]["key"], pki["cert"], pki["key"], str(gw.pid_file),
                   check_url=gw.url.replace("https", "http"))
    assert "not an https:// URL" in raised.value.message
    with pytest.raises(RunyardError) as raised:
        rotate_tls(pki["new"]["cert"], pki["new"]["key"], pki["cert"], pki["key"], str(gw.pid_file),
                   nginx_conf=str(d / "absent.conf"))
    assert "--nginx-conf" in raised.value.message
    assert (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes()) == before


def test_a_pair_nginx_rejects_is_undone_without_a_reload(tls_gateway, pki):
    gw = tls_gateway
    # RSA-1024: a valid, matching pair for localhost that OpenSSL's default security level refuses.
    weak_cert, weak_key = _leaf(pki["dir"] / "new-ca", pki["dir"] / "weak",
                                key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    before = (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes())
    workers = gw.nginx.workers()
    with pytest.raises(RunyardError) as raised:
        rotate_tls(weak_cert, weak_key, pki["cert"], pki["key"], str(gw.pid_file), nginx_conf=str(gw.conf),
                   check_url=gw.url)
    message = raised.value.message
    assert "nginx -t rejects" in message and "key too small" in message
    assert "Rolled back: the old files are back in place; NGINX was not reloaded" in message
    assert not any(line in message for line in _key_lines(weak_key))
    assert (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes()) == before
    assert Path(pki["key"]).stat().st_mode & 0o777 == 0o600
    assert gw.nginx.workers() == workers
    assert _served(gw) == _fingerprint(pki["cert"])


def test_files_the_running_nginx_does_not_use_are_refused(tls_gateway, pki):
    gw = tls_gateway
    elsewhere = pki["dir"] / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(pki["cert"], elsewhere / "cert.pem")
    shutil.copy(pki["key"], elsewhere / "key.pem")
    workers = gw.nginx.workers()
    with pytest.raises(RunyardError) as raised:
        rotate_tls(pki["new"]["cert"], pki["new"]["key"], str(elsewhere / "cert.pem"),
                   str(elsewhere / "key.pem"), str(gw.pid_file), check_url=gw.url)
    assert "does not use" in raised.value.message and "Rolled back" in raised.value.message
    assert (elsewhere / "cert.pem").read_bytes() == Path(pki["cert"]).read_bytes()
    assert gw.nginx.workers() == workers


def test_a_certificate_clients_do_not_see_is_undone_and_nginx_reloaded_again(tls_gateway, pki, tmp_path):
    """`check_url` reaches another NGINX (say, the other node behind a load balancer) that still serves
    the old certificate: the handshake check fails after the reload, so the old files go back and this
    NGINX is reloaded onto them again."""
    gw = tls_gateway
    other_files = tmp_path / "other-node"
    other_files.mkdir()
    shutil.copy(pki["cert"], other_files / "cert.pem")
    shutil.copy(pki["key"], other_files / "key.pem")
    other = start_gateway(tmp_path, gw.server, auth="token",
                          tls=(str(other_files / "cert.pem"), str(other_files / "key.pem")), name="other")
    try:
        old_fingerprint = _fingerprint(pki["cert"])
        before = (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes())
        workers = gw.nginx.workers()
        with pytest.raises(RunyardError) as raised:
            rotate_tls(pki["new"]["cert"], pki["new"]["key"], pki["cert"], pki["key"], str(gw.pid_file),
                       check_url=other.url, verify_timeout_s=1)
        message = raised.value.message
        assert "still presents" in message and "not the new certificate" in message
        assert "NGINX reloaded and presents the old certificate again" in message
        assert (Path(pki["cert"]).read_bytes(), Path(pki["key"]).read_bytes()) == before
        assert wait_for(lambda: not workers & gw.nginx.workers(), timeout=30)  # reloaded (twice)
        assert _served(gw) == old_fingerprint
        assert requests.get(f"{gw.url}/health", verify=pki["old"]["ca"], timeout=30).status_code == 200
    finally:
        other.nginx.stop()


def test_covers():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mlflow.example.com")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
            .public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("mlflow.example.com"), x509.DNSName("*.apps.example.com"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.7"))]), critical=False)
            .sign(key, hashes.SHA256()))
    assert tls.covers(cert, "mlflow.example.com") and tls.covers(cert, "MLFLOW.example.com.")
    assert tls.covers(cert, "tracking.apps.example.com") and tls.covers(cert, "10.0.0.7")
    assert not tls.covers(cert, "a.b.apps.example.com") and not tls.covers(cert, "apps.example.com")
    assert not tls.covers(cert, "example.com") and not tls.covers(cert, "10.0.0.8")


def test_token_rotation_checked_through_tls(tls_gateway, pki, tmp_path, monkeypatch):
    """`check_url` over TLS trusts what MLflow clients trust: MLFLOW_TRACKING_SERVER_CERT_PATH."""
    gw = tls_gateway
    uri = gw.server.backend_uri
    tokens.create(uri, "over-tls", "robot", None, None)
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", pki["old"]["ca"])
    report = rotate_token(uri, "over-tls", 0, to=str(tmp_path / "token"), check_url=gw.url)
    assert report["verified"] == ["store", "check_url", "secret"]

    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", pki["new"]["ca"])  # not the CA of this server
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, "over-tls", 0, to=str(tmp_path / "token"), check_url=gw.url)
    assert "certificate verify failed" in raised.value.message and "Rolled back" in raised.value.message
