"""A throwaway MIT Kerberos realm for tests: krb5kdc and kadmind from the Debian packages (krb5-kdc,
krb5-admin-server), their database and config in a temp dir, listening on free loopback ports, stopped by
PID. Principals get keytabs; ticket lifetimes are short when a test wants to watch tickets expire.

    with realm(workdir, ticket_lifetime="1m") as kdc:
        keytab = kdc.add_principal("alice")           # alice@TEST.LOCAL, random key, exported
        env = kdc.env                                 # KRB5_CONFIG (+ KRB5_KDC_PROFILE for the admin tools)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers.databases import SBIN_PATH, Unavailable
from helpers.ports import free_ports, port_open, wait_for

REALM = "TEST.LOCAL"
BINARIES = ("krb5kdc", "kadmind", "kdb5_util", "kadmin.local", "kinit")

KRB5_CONF = """\
[libdefaults]
  default_realm = {realm}
  dns_lookup_realm = false
  dns_lookup_kdc = false
  rdns = false
  dns_canonicalize_hostname = false
  udp_preference_limit = 1
  ticket_lifetime = {ticket_lifetime}
  renew_lifetime = {renewable_lifetime}
  # a short skew, so an expired ticket is refused as soon as it expires (the default forgives 5 min)
  clockskew = {clockskew}
[realms]
  {realm} = {{
    kdc = 127.0.0.1:{kdc_port}
    admin_server = 127.0.0.1:{kadmin_port}
  }}
[domain_realm]
  localhost = {realm}
  127.0.0.1 = {realm}
"""

KDC_CONF = """\
[kdcdefaults]
  kdc_listen = 127.0.0.1:{kdc_port}
  kdc_tcp_listen = 127.0.0.1:{kdc_port}
[realms]
  {realm} = {{
    database_name = {dir}/principal
    key_stash_file = {dir}/stash
    acl_file = {dir}/kadm5.acl
    kadmind_listen = 127.0.0.1:{kadmin_port}
    kpasswd_listen = 127.0.0.1:{kpasswd_port}
    max_life = {ticket_lifetime}
    max_renewable_life = {renewable_lifetime}
    supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
  }}
[logging]
  kdc = FILE:{dir}/kdc.log
  admin_server = FILE:{dir}/kadmind.log
  default = FILE:{dir}/krb5.log
"""


@dataclass
class Realm:
    name: str
    workdir: Path
    kdc_port: int
    kadmin_port: int
    env: dict[str, str]  # KRB5_CONFIG and KRB5_KDC_PROFILE: what clients, servers and kadmin.local read
    ticket_lifetime: str
    renewable_lifetime: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.name}"

    def kadmin(self, query: str) -> str:
        done = subprocess.run(["kadmin.local", "-r", self.name, "-q", query], env={**os.environ, **self.env},
                              capture_output=True, text=True, check=False)
        # kadmin.local exits 0 even when the query fails: anything on stderr but the policy notice is one
        complaints = [line for line in done.stderr.splitlines() if line and not line.startswith("No policy")]
        if done.returncode != 0 or complaints:
            raise RuntimeError(f"kadmin.local -q {query!r} failed: {' '.join(complaints)}")
        return done.stdout

    def add_principal(self, name: str, keytab: Path | None = None) -> Path:
        """Creates `name` with a random key (lifetimes of the realm) and exports it to a keytab."""
        keytab = keytab or self.workdir / f"{name.replace('/', '_')}.keytab"
        life = f"-maxlife {self.ticket_lifetime} -maxrenewlife {self.renewable_lifetime}"
        self.kadmin(f"addprinc -randkey {life} {self.principal(name)}")
        self.kadmin(f"ktadd -k {keytab} {self.principal(name)}")
        return keytab

    def change_key(self, name: str) -> None:
        """A new random key in the KDC: keytabs exported before hold a key that no longer works."""
        self.kadmin(f"cpw -randkey {self.principal(name)}")

    def kinit(self, name: str, keytab: Path, ccache: Path) -> None:
        """A ticket for `name` in the FILE ccache `ccache`, as an operator's kinit would leave it."""
        subprocess.run(["kinit", "-kt", str(keytab), "-c", f"FILE:{ccache}", self.principal(name)],
                       env={**os.environ, **self.env}, check=True, capture_output=True)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _require_binaries() -> None:
    missing = [name for name in BINARIES if not shutil.which(name, path=SBIN_PATH)]
    if missing:
        raise Unavailable(f"MIT Kerberos binaries not found: {', '.join(missing)} "
                          "(apt-get install krb5-kdc krb5-admin-server krb5-user)")


@contextmanager
def realm(workdir: Path, ticket_lifetime: str = "1h", renewable_lifetime: str = "2h",
          clockskew: int = 5) -> Iterator[Realm]:
    """A running KDC + kadmind for REALM under `workdir` (created). Lifetimes use kadmin syntax ("1m",
    "90s", "10h"); they cap every ticket of the realm, TGTs included."""
    _require_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    kdc_port, kadmin_port, kpasswd_port = free_ports(3)
    values = dict(realm=REALM, dir=workdir, kdc_port=kdc_port, kadmin_port=kadmin_port,
                  kpasswd_port=kpasswd_port, ticket_lifetime=ticket_lifetime,
                  renewable_lifetime=renewable_lifetime, clockskew=clockskew)
    (workdir / "krb5.conf").write_text(KRB5_CONF.format(**values))
    (workdir / "kdc.conf").write_text(KDC_CONF.format(**values))
    (workdir / "kadm5.acl").write_text(f"*/admin@{REALM} *\n")
    env = {"KRB5_CONFIG": str(workdir / "krb5.conf"), "KRB5_KDC_PROFILE": str(workdir / "kdc.conf")}
    full_env = {**os.environ, **env, "PATH": SBIN_PATH}
    kdc = Realm(REALM, workdir, kdc_port, kadmin_port, env, ticket_lifetime, renewable_lifetime)
    try:
        # The master password only guards the throwaway database's stash file in `workdir`.
        subprocess.run(["kdb5_util", "create", "-s", "-r", REALM, "-P", os.urandom(12).hex()], env=full_env,
                       check=True, capture_output=True)
        # kdb5_util gives krbtgt the realm's max_life; set both explicitly so TGTs are short too.
        kdc.kadmin(f"modprinc -maxlife {ticket_lifetime} -maxrenewlife {renewable_lifetime} krbtgt/{REALM}")
        for command in (["krb5kdc", "-n", "-r", REALM], ["kadmind", "-nofork", "-r", REALM]):
            kdc.processes.append(subprocess.Popen(command, env=full_env, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
        if not wait_for(lambda: any(p.poll() is not None for p in kdc.processes)
                        or (port_open(kdc_port) and port_open(kadmin_port)), timeout=20) \
                or any(p.poll() is not None for p in kdc.processes):
            logs = "\n".join((workdir / name).read_text(errors="replace")[-2000:]
                             for name in ("kdc.log", "kadmind.log") if (workdir / name).exists())
            raise RuntimeError(f"the test KDC did not start:\n{logs}")
        yield kdc
    finally:
        kdc.stop()
