"""SFTP: a real OpenSSH sshd (Debian openssh-server) on a loopback port, with its own config, host key,
authorised client key and PID file in the work dir; the system's sshd is never touched.

The store is pointed at the client key and at a known_hosts file holding the host key through
RUNYARD_SFTP_KEY_FILE and RUNYARD_SFTP_KNOWN_HOSTS. `bad_env` swaps in a second key the server has never
seen. sshd insists on /run/sshd (privilege separation) when started as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers.databases import Unavailable
from helpers.ports import free_port, port_open, wait_for
from helpers.stores import StoreUnderTest
from server.artifacts.sftp import KEY_FILE_ENV, KNOWN_HOSTS_ENV

SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT_S = 20


@dataclass
class SSHServer:
    port: int
    user: str
    folder: Path  # config, keys, known_hosts, log
    client_key: Path  # authorised
    other_key: Path  # a valid key the server does not know
    known_hosts: Path  # holds the host key for [127.0.0.1]:port
    host_public_key: str  # "ssh-ed25519 AAAA…"

    def env(self, key: Path | None = None, known_hosts: Path | None = None) -> dict[str, str]:
        return {KEY_FILE_ENV: str(key or self.client_key),
                KNOWN_HOSTS_ENV: str(known_hosts or self.known_hosts)}

    def log(self) -> str:
        return (self.folder / "sshd.log").read_text(errors="replace")


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path` (and `path`.pub); returns the public key line."""
    for old in (path, path.with_suffix(".pub")):  # ssh-keygen would ask before overwriting
        old.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "runyard-test", "-f", str(path)],
                   check=True, capture_output=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@contextmanager
def sshd(workdir: Path) -> Iterator[SSHServer]:
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        raise Unavailable("OpenSSH sshd / ssh-keygen not found (apt-get install openssh-server)")
    folder = workdir / "sshd"
    folder.mkdir(parents=True, exist_ok=True)
    host_public_key = keygen(folder / "host_key")
    client_public_key = keygen(folder / "client_key")
    keygen(folder / "other_key")
    (folder / "authorized_keys").write_text(client_public_key + "\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    port = free_port()
    (folder / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {folder}/host_key
PidFile {folder}/sshd.pid
AuthorizedKeysFile {folder}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {user}
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    known_hosts = folder / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_public_key}\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    log_path = folder / "sshd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for(lambda: proc.poll() is not None or port_open(port), START_TIMEOUT_S) \
                or proc.poll() is not None:
            raise RuntimeError(f"sshd did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield SSHServer(port, user, folder, folder / "client_key", folder / "other_key", known_hosts,
                        host_public_key)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the listener; its per-connection children end with their connections
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    with sshd(workdir) as server:
        files = workdir / "files"
        files.mkdir(exist_ok=True)
        yield StoreUnderTest(name="sftp", uri=f"sftp://{server.user}@127.0.0.1:{server.port}{files}",
                             env=server.env(), bad_env=server.env(key=server.other_key), secrets=())
