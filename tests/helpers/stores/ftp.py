"""FTP: a real pyftpdlib server (plain, or FTPS with a self-signed certificate) in a child process, one
user with a password and a home folder in the work dir; and, for FTPS against a C server that speaks
neither MLSD nor unsafe TLS, Debian's vsftpd (anonymous, as its local users need system accounts + PAM).

The server binds port 0 itself and prints the port it got, so no other job can take it in between. FTP
credentials live in the URI, so the conformance suite has no `bad_env` for it: the wrong password is
tested in tests/server/test_artifacts_ftp_sftp.py.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from helpers.databases import Unavailable
from helpers.ports import free_ports, port_open, wait_for
from helpers.stores import StoreUnderTest

USER = "runyard"
START_TIMEOUT_S = 20

SERVER_SCRIPT = r"""
import sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
from pyftpdlib.servers import ThreadedFTPServer

home, user, password, certfile, keyfile, mlst = sys.argv[1:7]
authorizer = DummyAuthorizer()
authorizer.add_user(user, password, home, perm="elradfmwMT")
base = TLS_FTPHandler if certfile else FTPHandler


class Handler(base):
    authorizer = authorizer
    banner = "runyard test FTP server"
    auth_failed_timeout = 0.1  # the default 3 s pause after a wrong password only slows the tests


if certfile:
    Handler.certfile, Handler.keyfile = certfile, keyfile
    Handler.tls_control_required = Handler.tls_data_required = True  # no plain-text fallback
if mlst == "no":  # an older server: LIST, SIZE and CWD only
    Handler.proto_cmds = {k: v for k, v in base.proto_cmds.items() if k not in ("MLST", "MLSD")}
server = ThreadedFTPServer(("127.0.0.1", 0), Handler)
print(server.address[1], flush=True)
server.serve_forever()
"""


@dataclass
class FTPServer:
    port: int
    user: str
    password: str
    home: Path
    certfile: Path | None  # FTPS only: the self-signed certificate a client must trust

    def uri(self, path: str = "/root", password: str | None = None) -> str:
        scheme = "ftps" if self.certfile else "ftp"
        secret = quote(self.password if password is None else password, safe="")
        return f"{scheme}://{quote(self.user, safe='')}:{secret}@127.0.0.1:{self.port}{path}"


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, made with the cryptography package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    certfile, keyfile = folder / "ftps-cert.pem", folder / "ftps-key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


@contextmanager
def ftp_server(workdir: Path, tls: bool = False, mlst: bool = True,
               password: str | None = None) -> Iterator[FTPServer]:
    """A pyftpdlib server in a child process; stopped (by its PID) on exit."""
    try:
        import pyftpdlib  # noqa: F401
        if tls:
            import OpenSSL  # noqa: F401  (pyftpdlib's TLS handler needs pyOpenSSL)
    except ImportError as exc:
        raise Unavailable(f"{exc.name} is not installed (pip install pyftpdlib pyopenssl)") from None
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    password = password or f"pw-{uuid.uuid4().hex}"  # per run, so a leak check cannot pass by luck
    certfile, keyfile = self_signed_certificate(workdir) if tls else (None, None)
    log_path = workdir / "pyftpdlib.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(home), USER, password, str(certfile or ""),
             str(keyfile or ""), "yes" if mlst else "no"],
            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
    try:
        line = proc.stdout.readline()  # the port, once it listens; empty if the server died
        if not line.strip().isdigit():
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pyftpdlib did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield FTPServer(int(line), USER, password, home, certfile)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    with ftp_server(workdir) as server:
        yield StoreUnderTest(name="ftp", uri=server.uri("/root"), env={}, bad_env=None,
                             secrets=(server.password,))


@dataclass
class VsftpdServer:
    port: int
    incoming: Path  # the anonymous user's writable folder, "/incoming" in its URIs

    def uri(self, path: str) -> str:
        return f"ftps://anonymous@127.0.0.1:{self.port}/incoming{path}"


@contextmanager
def vsftpd_server(workdir: Path) -> Iterator[VsftpdServer]:
    """vsftpd with anonymous FTPS only (TLS required for login and data, TLS session reuse required);
    needs root: vsftpd drops to the `ftp` user, which must own the upload folder."""
    vsftpd = shutil.which("vsftpd") or "/usr/sbin/vsftpd"
    if not os.path.exists(vsftpd) or os.geteuid() != 0:
        raise Unavailable("vsftpd is not installed or the tests do not run as root (apt-get install vsftpd)")
    folder = workdir / "vsftpd"
    anon_root = folder / "anon"
    (anon_root / "incoming").mkdir(parents=True, exist_ok=True)
    anon_root.chmod(0o555)  # vsftpd refuses a writable anonymous root
    os.chown(anon_root / "incoming", pwd.getpwnam("ftp").pw_uid, -1)
    certfile, keyfile = self_signed_certificate(folder)
    port, passive = free_ports(2)
    os.makedirs("/var/run/vsftpd/empty", exist_ok=True)
    (folder / "vsftpd.conf").write_text(f"""listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port={port}
background=NO
anonymous_enable=YES
anon_root={anon_root}
no_anon_password=YES
write_enable=YES
anon_upload_enable=YES
anon_mkdir_write_enable=YES
anon_other_write_enable=YES
anon_umask=022
local_enable=NO
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port={passive}
pasv_max_port={passive}
secure_chroot_dir=/var/run/vsftpd/empty
seccomp_sandbox=NO
ssl_enable=YES
allow_anon_ssl=YES
force_anon_logins_ssl=YES
force_anon_data_ssl=YES
require_ssl_reuse=YES
rsa_cert_file={certfile}
rsa_private_key_file={keyfile}
xferlog_enable=YES
vsftpd_log_file={folder}/vsftpd.log
""")
    proc = subprocess.Popen([vsftpd, str(folder / "vsftpd.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_for(lambda: proc.poll() is not None or port_open(port), START_TIMEOUT_S) \
                or proc.poll() is not None:
            raise RuntimeError(f"vsftpd did not start (exit code {proc.poll()})")
        yield VsftpdServer(port, anon_root / "incoming")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
