"""toolkit.certs: the development CA, server and client certificates (a TLS handshake through a real
nginx is in test_nginx_render.py)."""

from __future__ import annotations

import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.errors import RunyardError
from toolkit.certs import issued_by, selfsigned


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as handle:
        return x509.load_pem_x509_certificate(handle.read())


def test_ca_server_and_client_certificates(tmp_path):
    out = tmp_path / "tls"
    paths = selfsigned(out, hosts=("runyard.internal", "localhost", "127.0.0.1", "::1"), days=30,
                       client="ci-robot")
    assert paths == {role: str(out / name) for role, name in [
        ("ca", "ca.pem"), ("ca_key", "ca-key.pem"), ("cert", "cert.pem"), ("key", "key.pem"),
        ("client_cert", "client-ci-robot.pem"), ("client_key", "client-ci-robot-key.pem")]}
    for role, path in paths.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == (0o600 if role.endswith("key") else 0o644), role
    assert sorted(p.name for p in out.iterdir()) == sorted(os.path.basename(p) for p in paths.values())

    ca, server, client = load(paths["ca"]), load(paths["cert"]), load(paths["client_cert"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issued_by(paths["cert"], paths["ca"]) and issued_by(paths["client_cert"], paths["ca"])

    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["runyard.internal", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                       ipaddress.ip_address("::1")]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (server.not_valid_after_utc - server.not_valid_before_utc).days <= 30

    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ci-robot"
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_the_ca_is_reused(tmp_path):
    first = selfsigned(tmp_path)
    ca_before = open(first["ca"], "rb").read()
    cert_before = open(first["cert"], "rb").read()
    second = selfsigned(tmp_path, hosts=("other.example",), client="alice")
    assert open(second["ca"], "rb").read() == ca_before
    assert open(second["cert"], "rb").read() != cert_before
    assert issued_by(second["cert"], first["ca"]) and issued_by(second["client_cert"], first["ca"])


def test_half_a_ca_is_refused(tmp_path):
    paths = selfsigned(tmp_path)
    os.unlink(paths["ca_key"])
    with pytest.raises(RunyardError, match="ca-key.pem does not"):
        selfsigned(tmp_path)


def test_a_ca_key_that_does_not_match_is_refused(tmp_path):
    one, two = selfsigned(tmp_path / "one"), selfsigned(tmp_path / "two")
    os.replace(two["ca_key"], one["ca_key"])
    with pytest.raises(RunyardError, match="is not the key of"):
        selfsigned(tmp_path / "one")


@pytest.mark.parametrize("kwargs, flag", [
    ({"client": "../evil"}, "--client"),
    ({"client": "a b"}, "--client"),
    ({"client": ""}, "--client"),
    ({"client": "-x"}, "--client"),
    ({"hosts": ("bad host",)}, "--host"),
    ({"hosts": ("under_score.example",)}, "--host"),
    ({"hosts": ()}, "--host"),
    ({"days": 0}, "--days"),
    ({"days": 100_000}, "--days"),
])
def test_bad_arguments(tmp_path, kwargs, flag):
    with pytest.raises(RunyardError) as caught:
        selfsigned(tmp_path / "tls", **kwargs)
    assert caught.value.message.startswith(flag) and caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert not (tmp_path / "tls").exists()  # nothing written for a refused request
