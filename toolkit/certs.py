"""Self-signed certificates for development and tests: a small CA, a server certificate, client ones.

`selfsigned(out_dir)` writes, in `out_dir`:
  ca.pem, ca-key.pem                   the CA (reused when both files are already there)
  cert.pem, key.pem                    the server certificate for `hosts` (DNS names and IP addresses)
  client-<name>.pem, -key.pem          with `client`: a client certificate (CN=<name>) for mutual TLS
Private keys are created 0600 and certificates 0644; every file appears complete or not at all.
Not for production: real deployments use certificates from their own CA or ACME.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.errors import RunyardError
from toolkit.files import replace_atomically

CA_DAYS = 3650
MAX_DAYS = 3650
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


def _invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(host) or len(host) > 253:
        raise _invalid(f"--host: {host!r} is neither a DNS name nor an IP address.")
    return x509.DNSName(host.lower())


def _write_atomic(path: Path, data: bytes, private: bool) -> None:
    """Writes `path` atomically: 0600 from creation for keys, 0644 for certificates."""
    replace_atomically(path, data, prepare=None if private else lambda fd: os.fchmod(fd, 0o644))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Runyard development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Runyard development CA")])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            # path_length 0: this CA signs leaf certificates only
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"cannot reuse the CA in {cert_path.parent}: {exc}; delete ca.pem and ca-key.pem "
                       "to make a new one.") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise _invalid(f"{key_path}: only EC and RSA CA keys can sign here.")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise _invalid(f"{key_path} is not the key of {cert_path}.")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise _invalid(f"{cert_path} is not a CA certificate.")
    if cert.not_valid_after_utc <= _now():
        raise _invalid(f"the CA {cert_path} has expired; delete ca.pem and ca-key.pem to make a new one.")
    return cert, key


def _leaf(ca: x509.Certificate, ca_key, subject_cn: str, days: int, usage: x509.ObjectIdentifier,
          sans: list[x509.GeneralName] | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # A leaf never outlives its CA (a verifier would refuse it past that date anyway).
    not_after = min(now + datetime.timedelta(days=days), ca.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
               .issuer_name(ca.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def selfsigned(out_dir: str | os.PathLike, hosts=("localhost", "127.0.0.1"), days: int = 365,
               client: str | None = None) -> dict[str, str]:
    """Writes a development CA (or reuses the one in `out_dir`), a server certificate for `hosts` and,
    with `client`, a client certificate. Returns the written paths by role: ca, ca_key, cert, key and
    client_cert, client_key."""
    if isinstance(hosts, str):
        hosts = (hosts,)
    hosts = tuple(dict.fromkeys(h.strip() for h in hosts if h and h.strip()))
    if not hosts:
        raise _invalid("--host: at least one host name or IP address is required.")
    sans = [_san(host) for host in hosts]
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise _invalid(f"--days: {days!r} is not a number of days from 1 to {MAX_DAYS}.")
    if client is not None and (not isinstance(client, str) or not _CLIENT_NAME.fullmatch(client)):
        raise _invalid(f"--client: {client!r} is not a client name (letters, digits, . _ -; up to 64, "
                       "starting with a letter or digit).")

    out = Path(out_dir).expanduser().absolute()
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _invalid(f"cannot create {out}: {exc.strerror}.") from None
    if not out.is_dir():
        raise _invalid(f"{out} is not a directory.")

    paths = {"ca": out / "ca.pem", "ca_key": out / "ca-key.pem", "cert": out / "cert.pem",
             "key": out / "key.pem"}
    have_cert, have_key = paths["ca"].is_file(), paths["ca_key"].is_file()
    if have_cert and have_key:
        ca, ca_key = _load_ca(paths["ca"], paths["ca_key"])
    elif have_cert or have_key:
        present, absent = (paths["ca"], paths["ca_key"]) if have_cert else (paths["ca_key"], paths["ca"])
        raise _invalid(f"{present} exists but {absent} does not; restore it, or delete both to make "
                       "a new CA.")
    else:
        ca, ca_key = _new_ca()
        # key first: a ca.pem without its key would stop the next run
        _write_atomic(paths["ca_key"], _key_pem(ca_key), private=True)
        _write_atomic(paths["ca"], _cert_pem(ca), private=False)

    cert, key = _leaf(ca, ca_key, hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    _write_atomic(paths["key"], _key_pem(key), private=True)
    _write_atomic(paths["cert"], _cert_pem(cert), private=False)

    if client is not None:
        paths["client_cert"] = out / f"client-{client}.pem"
        paths["client_key"] = out / f"client-{client}-key.pem"
        cert, key = _leaf(ca, ca_key, client, days, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        _write_atomic(paths["client_key"], _key_pem(key), private=True)
        _write_atomic(paths["client_cert"], _cert_pem(cert), private=False)
    return {role: str(path) for role, path in paths.items()}


def issued_by(cert_path: str | os.PathLike, ca_path: str | os.PathLike) -> bool:
    """Whether the certificate in `cert_path` is signed by the CA in `ca_path`."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
