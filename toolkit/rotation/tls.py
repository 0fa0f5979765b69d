"""`runyard rotate tls`: a new certificate and key for the running NGINX, reloaded gracefully, verified,
and put back as they were on any failure.

1. validate the new pair before touching anything: the certificate file holds a certificate (then its
   chain, each one issued by the next), the key is an unencrypted private key that matches it, the
   certificate is valid now, and it covers `check_url`'s host (subjectAltName, as clients check it);
2. copy the installed files aside (`<file>.previous`, the key 0600) and install the new ones, each
   written to a temporary file beside it and renamed over it (the key 0600; the certificate keeps its
   mode; both keep their owner and group);
3. `nginx -T` on the running configuration (the master's `-c`, or `nginx_conf`): it must pass, and its
   `ssl_certificate` / `ssl_certificate_key` must name the installed files, or the new ones would never
   be served;
4. SIGHUP to the master in `nginx_pid_file` (what `nginx -s reload` sends): new workers start with the new
   files, the old ones finish the requests they hold and leave, so nothing in flight is cut;
5. with `check_url`, a TLS handshake there must present the new certificate (SHA-256 fingerprints).

A failure in 2-5 puts the old files back and, once NGINX was reloaded, reloads it again (and checks the
old certificate is served). The key's content never appears in a report or an error message.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from server.errors import RunyardError, invalid
from toolkit.db import SILENT, Progress
from toolkit.files import replace_atomically
from toolkit.nginx import CHECK_TIMEOUT_S, find_nginx

RELOAD_TIMEOUT_S = 30.0
VERIFY_TIMEOUT_S = 15.0
HANDSHAKE_TIMEOUT_S = 5.0
_MASTER = "nginx: master process"
_WORKER = "nginx: worker process"
_SSL_FILES = re.compile(r"^\s*(ssl_certificate|ssl_certificate_key)\s+"
                        r"(?:\"([^\"]+)\"|'([^']+)'|([^\s;]+))\s*;", re.MULTILINE)
_LOG_PREFIX = re.compile(r"^(?:nginx: )?(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(\[\w+\]) (?:\d+#\d+: )?")


def _fail(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_STATE")


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, as `openssl x509 -fingerprint -sha256` prints it."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


# --- 1. the new pair -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pair:
    cert_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate
    fingerprint: str
    hosts: tuple[str, ...]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RunyardError(f"{what} {path} does not exist.", "RESOURCE_DOES_NOT_EXIST") from None
    except OSError as exc:
        raise _fail(f"cannot read {what} {path}: {exc.strerror}") from None


def _san_hosts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    addresses = (str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return (*san.get_values_for_type(x509.DNSName), *addresses)


def covers(cert: x509.Certificate, host: str) -> bool:
    """Whether a client connecting to `host` accepts `cert`'s names (subjectAltName only, as browsers and
    Python do; a `*.` wildcard stands for exactly one leftmost label)."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for name in _san_hosts(cert):
        if address is not None:
            try:
                if ipaddress.ip_address(name) == address:
                    return True
            except ValueError:
                continue
        else:
            name = name.rstrip(".").lower()
            if name == host:
                return True
            if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:] \
                    and host.split(".", 1)[0]:
                return True
    return False


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def validate_pair(cert_path: str, key_path: str, host: str | None = None) -> _Pair:
    """The new certificate (with its chain) and key, checked as described in the module's docstring."""
    cert_pem = _read(cert_path, "the certificate")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise invalid(f"{cert_path} holds no PEM certificate.") from None
    leaf = chain[0]
    key_pem = _read(key_path, "the key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise invalid(f"{key_path} is an encrypted key; NGINX would ask for its passphrase at every "
                      "reload: give it the key without a passphrase (0600).") from None
    except (ValueError, UnsupportedAlgorithm):
        raise invalid(f"{key_path} holds no PEM private key NGINX could use.") from None  # never the content
    if _public(key.public_key()) != _public(leaf.public_key()):
        raise invalid(f"{key_path} is not the key of the certificate in {cert_path}.")
    for child, parent in zip(chain, chain[1:], strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise invalid(f"{cert_path}: certificate {chain.index(child) + 1} "
                          f"({child.subject.rfc4514_string()}) is not issued by the next one "
                          f"({parent.subject.rfc4514_string()}); the file "
                          "must hold the server certificate first, then its chain in order.") from None
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= now:
        raise invalid(f"{cert_path} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC.")
    if leaf.not_valid_before_utc > now:
        raise invalid(f"{cert_path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.")
    hosts = _san_hosts(leaf)
    if host is not None and not covers(leaf, host):
        names = ", ".join(hosts) or "none"
        raise invalid(f"{cert_path} does not cover {host} (its subjectAltName: {names}); clients would "
                      "refuse it.")
    return _Pair(cert_pem, key_pem, leaf, fingerprint(leaf.public_bytes(serialization.Encoding.DER)), hosts)


# --- 2. files ------------------------------------------------------------------------------------------

def _write_atomic(target: Path, data: bytes, mode: int, like: os.stat_result | None) -> None:
    """`data` into `target` atomically: `mode` from the first byte, the owner and group of `like`."""
    def prepare(fd: int) -> None:
        if like is not None and (like.st_uid, like.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, like.st_uid, like.st_gid)
            except PermissionError:
                raise RunyardError(f"not allowed to give {target} owner id {like.st_uid} and group id "
                                   f"{like.st_gid} (run as its owner or as root)",
                                   "PERMISSION_DENIED") from None
        os.fchmod(fd, mode)

    try:
        replace_atomically(target, data, prepare=prepare)
    except OSError as exc:
        raise _fail(f"cannot write {target}: {exc.strerror or exc}") from None


@dataclass
class _Installed:
    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes
    cert_stat: os.stat_result
    key_stat: os.stat_result

    @classmethod
    def read(cls, cert: str, key: str) -> _Installed:
        # Through symlinks (certbot's live/ folder): the files they point to are the ones replaced.
        cert_path, key_path = Path(os.path.realpath(cert)), Path(os.path.realpath(key))
        cert_pem, key_pem = _read(str(cert_path), "the installed certificate"), _read(str(key_path),
                                                                                      "the installed key")
        return cls(cert_path, key_path, cert_pem, key_pem, cert_path.stat(), key_path.stat())

    def fingerprint(self) -> str | None:
        try:
            return fingerprint(x509.load_pem_x509_certificate(self.cert_pem).public_bytes(
                serialization.Encoding.DER))
        except ValueError:
            return None

    def backup(self) -> tuple[str, str]:
        cert = self.cert.with_name(self.cert.name + ".previous")
        key = self.key.with_name(self.key.name + ".previous")
        _write_atomic(key, self.key_pem, 0o600, self.key_stat)
        _write_atomic(cert, self.cert_pem, stat.S_IMODE(self.cert_stat.st_mode), self.cert_stat)
        return str(cert), str(key)

    def install(self, cert_pem: bytes, key_pem: bytes) -> None:
        _write_atomic(self.key, key_pem, 0o600, self.key_stat)
        _write_atomic(self.cert, cert_pem, stat.S_IMODE(self.cert_stat.st_mode), self.cert_stat)

    def restore(self) -> None:
        _write_atomic(self.key, self.key_pem, stat.S_IMODE(self.key_stat.st_mode), self.key_stat)
        _write_atomic(self.cert, self.cert_pem, stat.S_IMODE(self.cert_stat.st_mode), self.cert_stat)


# --- 3, 4. the running NGINX ---------------------------------------------------------------------------

def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _master_pid(pid_file: str) -> int:
    text = _read(pid_file, "the NGINX pid file").decode(errors="replace").strip()
    if not text.isdigit():
        raise _fail(f"{pid_file} holds no process id; is NGINX running?")
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise _fail(f"no process {pid} (from {pid_file}) is running; is NGINX running?") from None
    except PermissionError:
        pass  # it exists; signalling it will need the right user, said below if so
    # A stale pid file may name another program now: SIGHUP would stop it. Only an NGINX master is told.
    if not _proc_cmdline(pid).startswith(_MASTER):
        raise _fail(f"process {pid} (from {pid_file}) is not an NGINX master process; is the pid file stale?")
    return pid


def _running_options(pid: int) -> tuple[str | None, list[str]]:
    """The `-c` configuration file the master was started with (None without one) and its `-p` prefix
    option. NGINX rewrites its argv into one space-joined title, so only these options, whose values are
    single words, are recovered; the `-g` directives (daemon, worker settings) do not change what the
    certificates are checked against."""
    words = _proc_cmdline(pid)[len(_MASTER):].split()
    conf, prefix = None, []
    for i, word in enumerate(words):
        for flag in ("-c", "-p"):
            if word == flag and i + 1 < len(words):
                value = words[i + 1]
            elif word.startswith(flag) and len(word) > 2:
                value = word[2:]
            else:
                continue
            if flag == "-c":
                conf = value
            else:
                prefix = ["-p", value]
    return conf, prefix


def _config(pid: int, nginx_conf: str | None) -> tuple[str, list[str]]:
    """The configuration to test: `nginx_conf`, else the master's `-c`, else nginx's compiled-in default;
    and the master's `-p` option."""
    started_with, prefix = _running_options(pid)
    if nginx_conf is not None:
        conf = os.path.abspath(os.path.expanduser(nginx_conf))
        if not os.path.isfile(conf):
            raise invalid(f"--nginx-conf: {conf} does not exist.")
        return conf, prefix
    conf = started_with or _compiled_conf_path()
    if not os.path.isabs(conf):
        raise invalid(f"NGINX was started with a relative configuration path ({conf}); give --nginx-conf.")
    return conf, prefix


def _compiled_conf_path() -> str:
    try:
        done = subprocess.run([find_nginx(), "-V"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    found = re.search(r"--conf-path=(\S+)", done.stderr + done.stdout) if done else None
    if not found:
        raise invalid("cannot tell which configuration file NGINX runs with; give --nginx-conf.")
    return found.group(1)


def _nginx_test(conf: str, prefix: list[str]) -> str:
    """`nginx -T` (test, then dump) on `conf`: the configuration's text, or RunyardError with nginx's
    complaint."""
    command = [find_nginx(), *prefix, "-T", "-c", conf]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise _fail(f"nginx -t did not finish within {CHECK_TIMEOUT_S} s.") from None
    except OSError as exc:
        raise _fail(f"cannot run {command[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        lines = [_LOG_PREFIX.sub(r"\1 ", line.strip()) for line in done.stderr.splitlines() if line.strip()]
        complaints = [line for line in lines if re.match(r"\[(emerg|alert|crit|error)\]", line)] or lines
        raise _fail(f"nginx -t rejects {conf} with the new files: {'; '.join(complaints)}")
    return done.stdout


def _check_uses(dump: str, conf: str, installed: _Installed) -> None:
    """The dumped configuration must name the installed files, or the rotation changes nothing."""
    named: dict[str, set[str]] = {"ssl_certificate": set(), "ssl_certificate_key": set()}
    for directive, *values in _SSL_FILES.findall(dump):
        value = next(v for v in values if v)
        if "$" in value or value.startswith("data:") or value.startswith("engine:"):
            return  # names chosen per connection or not files: nothing to compare
        named[directive].add(os.path.realpath(os.path.join(os.path.dirname(conf), value)))
    for directive, path in (("ssl_certificate", installed.cert), ("ssl_certificate_key", installed.key)):
        if str(path) not in named[directive]:
            found = ", ".join(sorted(named[directive])) or "none"
            raise _fail(f"the running configuration {conf} does not use {path} (its {directive}: {found}); "
                        "the rotation would not change what NGINX serves.")


def _children(pid: int) -> dict[int, str]:
    """The master's child processes and their titles."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):
            found[int(entry)] = _proc_cmdline(int(entry))
    return found


def _workers(pid: int) -> set[int]:
    """Workers that accept new connections (not those finishing old ones after a reload)."""
    return {child for child, title in _children(pid).items() if title == _WORKER or
            (title.startswith(_WORKER) and "shutting down" not in title)}


def _signal_reload(pid: int) -> set[int]:
    """SIGHUP to the master (what `nginx -s reload` sends); returns the workers it had."""
    old = _workers(pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise RunyardError(f"not allowed to signal NGINX (process {pid}); run as its user or root.",
                           "PERMISSION_DENIED") from None
    except ProcessLookupError:
        raise _fail(f"NGINX (process {pid}) is gone.") from None
    return old


def _wait_reloaded(pid: int, old: set[int], timeout_s: float) -> None:
    """Waits until new workers accept connections and the old ones no longer do (they are told to shut
    down about 100 ms after the new ones start, then only finish what they hold). When NGINX refuses the
    configuration at reload, it keeps the old workers and no new ones come."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = _workers(pid)
        if current - old and not current & old:
            return
        time.sleep(0.05)
    raise _fail(f"NGINX did not start new workers within {timeout_s:g} s of SIGHUP; see its error log "
                "(it keeps serving the configuration it had).")


# --- 5. what clients see -------------------------------------------------------------------------------

def _endpoint(check_url: str) -> tuple[str, int]:
    parts = urlsplit(check_url.strip())
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise invalid(f"--check-url: {check_url!r} is not an https:// URL.")
    if parts.username or parts.password:
        raise invalid("--check-url: put no credentials in the URL; none are needed for the handshake.")
    try:
        port = parts.port or 443
    except ValueError:
        raise invalid(f"--check-url: {check_url!r} has a bad port.") from None
    return parts.hostname, port


def served_fingerprint(host: str, port: int, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str:
    """The SHA-256 fingerprint of the certificate a TLS handshake with host:port presents (SNI = host).
    No verification: this compares certificates, it does not trust them."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    with socket.create_connection((host, port), timeout=timeout_s) as raw, \
            context.wrap_socket(raw, server_hostname=None if address else host) as tls:
        return fingerprint(tls.getpeercert(binary_form=True))


def _wait_served(host: str, port: int, wanted: str, timeout_s: float) -> str:
    """Handshakes until `wanted` is presented (an old worker may still take a connection or two right after
    the reload); the last fingerprint or failure seen otherwise."""
    deadline, last = time.monotonic() + timeout_s, "no handshake"
    while True:
        try:
            last = served_fingerprint(host, port)
            if last == wanted:
                return last
        except (OSError, ssl.SSLError) as exc:
            last = f"handshake failed: {exc}"
        if time.monotonic() >= deadline:
            return last
        time.sleep(0.1)


# --- the rotation --------------------------------------------------------------------------------------

def rotate_tls(cert: str, key: str, installed_cert: str, installed_key: str, nginx_pid_file: str,
               nginx_conf: str | None = None, check_url: str | None = None, progress: Progress = SILENT,
               reload_timeout_s: float = RELOAD_TIMEOUT_S, verify_timeout_s: float = VERIFY_TIMEOUT_S
               ) -> dict:
    """Installs the certificate `cert` and key `key` in place of `installed_cert`/`installed_key` and
    reloads the NGINX whose master's pid is in `nginx_pid_file`; see the module's docstring."""
    endpoint = _endpoint(check_url) if check_url else None
    progress.stage(f"Checking {cert} and {key}")
    pair = validate_pair(cert, key, endpoint[0] if endpoint else None)
    pid = _master_pid(nginx_pid_file)
    conf, prefix = _config(pid, nginx_conf)
    installed = _Installed.read(installed_cert, installed_key)
    old_fingerprint = installed.fingerprint()
    if old_fingerprint == pair.fingerprint and installed.key_pem == pair.key_pem:
        raise invalid(f"{cert} is already installed as {installed.cert}; nothing to rotate.")

    progress.stage("Copying the installed files aside")
    backup_cert, backup_key = installed.backup()
    reloaded, verified = False, ["pair"]
    try:
        progress.stage(f"Installing the new files as {installed.cert} and {installed.key}")
        installed.install(pair.cert_pem, pair.key_pem)
        progress.stage(f"Checking {conf} with nginx -t")
        _check_uses(_nginx_test(conf, prefix), conf, installed)
        verified.append("nginx -t")
        progress.stage(f"Reloading NGINX (process {pid})")
        old_workers = _signal_reload(pid)
        reloaded = True
        _wait_reloaded(pid, old_workers, reload_timeout_s)
        verified.append("reload")
        if endpoint is not None:
            progress.stage(f"Checking the certificate {endpoint[0]}:{endpoint[1]} presents")
            served = _wait_served(*endpoint, pair.fingerprint, verify_timeout_s)
            if served != pair.fingerprint:
                raise _fail(f"{endpoint[0]}:{endpoint[1]} still presents {served}, not the new certificate "
                            f"{pair.fingerprint}")
            verified.append("handshake")
    except BaseException as exc:
        progress.stage("Putting the old files back")
        note = _roll_back(installed, pid, conf, prefix, reloaded, endpoint, old_fingerprint, reload_timeout_s,
                          verify_timeout_s)
        if isinstance(exc, RunyardError):
            raise RunyardError(f"{exc.message}. Rolled back: {note}", exc.error_code) from None
        raise

    return {
        "kind": "tls",
        "installed_cert": str(installed.cert),
        "installed_key": str(installed.key),
        "previous_cert": backup_cert,
        "previous_key": backup_key,
        "old_fingerprint_sha256": old_fingerprint,
        "new_fingerprint_sha256": pair.fingerprint,
        "subject": pair.leaf.subject.rfc4514_string(),
        "hosts": list(pair.hosts),
        "not_after": pair.leaf.not_valid_after_utc.isoformat(),
        "nginx_pid": pid,
        "nginx_conf": conf,
        "check_url": check_url,
        "verified": verified,
    }


def _roll_back(installed: _Installed, pid: int, conf: str, prefix: list[str], reloaded: bool,
               endpoint: tuple[str, int] | None, old_fingerprint: str | None, reload_timeout_s: float,
               verify_timeout_s: float) -> str:
    """Puts the old files back (and NGINX on them, when it was reloaded); says what happened."""
    try:
        installed.restore()
    except RunyardError as exc:
        return (f"the old files could NOT be put back ({exc.message}); copies are in "
                f"{installed.cert}.previous and {installed.key}.previous")
    if not reloaded:
        return "the old files are back in place; NGINX was not reloaded and serves them as before"
    try:
        _nginx_test(conf, prefix)
        _wait_reloaded(pid, _signal_reload(pid), reload_timeout_s)
    except RunyardError as exc:
        return f"the old files are back in place, but reloading NGINX on them failed: {exc.message}"
    if endpoint is not None and old_fingerprint is not None:
        served = _wait_served(*endpoint, old_fingerprint, verify_timeout_s)
        if served != old_fingerprint:
            return (f"the old files are back and NGINX reloaded, but {endpoint[0]}:{endpoint[1]} presents "
                    f"{served}")
        return "the old files are back, NGINX reloaded and presents the old certificate again"
    return "the old files are back in place and NGINX reloaded"
