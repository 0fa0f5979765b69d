"""NGINX in front of `runyard server`: settings, the rendered nginx.conf, and validation with `nginx -t`.

The templates live in the top-level `nginx/` folder (shipped in the wheel beside `toolkit/`). Every value
that reaches the configuration is checked first, so no flag can smuggle nginx syntax into it. Paths are
made absolute but need not exist when rendering, since a configuration may be meant for another host;
`write` (validating, on the host that runs nginx) checks it with the real `nginx -t`, and checks what
`nginx -t` cannot see, before it replaces the target file.

Every auth mode goes through auth_request to the servers' `/_runyard/auth`: they check bearer tokens
(backend store) and basic-auth passwords (`runyard server --htpasswd`), so NGINX holds no credential.

Run as root, nginx workers drop to `worker_user` (nobody when it is omitted): they write large request
bodies into the temp folders inside the state directory, so `write` hands a state directory it creates
to that user and refuses one the workers cannot reach.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import jinja2

from server.errors import RunyardError
from toolkit.files import FolderNotWritable, replace_atomically

# Beside toolkit/ in the source tree, in an editable install and in the wheel alike.
TEMPLATES = Path(__file__).resolve().parent.parent / "nginx"
AUTH_MODES = ("basic", "token", "basic+token", "none")
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
# The server refuses JSON bodies above this (server/api/message.py MAX_JSON_BODY): fail early at the proxy.
API_BODY_LIMIT = "64m"
# Failed logins accepted at once before the rate applies.
LOGIN_BURST = 10
# Mozilla "intermediate" (v5.7) without the DHE suites, which would need a dhparam file.
SSL_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
CHECK_TIMEOUT_S = 60
FALLBACK_NGINX = "/usr/sbin/nginx"  # Debian's, for when /usr/sbin is not on PATH (cron, sudo -u)
NGINX_DEFAULT_USER = "nobody"  # what a root nginx master runs workers as without a `user` directive

_UNSAFE = re.compile(r"[\s;{}'\"$#\\\x00-\x1f\x7f]")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?")
_SERVER_NAME = re.compile(r"_|(?:\*\.)?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*(?:\.\*)?")
_PREFIX = re.compile(r"[A-Za-z0-9._~/-]+")
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
_SIZE = re.compile(r"0|[1-9][0-9]*[kKmMgG]?")
_RATE = re.compile(r"[1-9][0-9]*r/[sm]")


def _invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")


def _unsafe_char(value: str) -> str | None:
    found = _UNSAFE.search(value)
    return found.group() if found else None


def _path(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(f"{flag}: a file path is required.")
    char = _unsafe_char(value)
    if char is not None:
        raise _invalid(f"{flag}: {value!r} contains {char!r}, which NGINX would read as configuration "
                       "syntax; use a path without whitespace, quotes, ; {{ }} $ # or backslashes.")
    absolute = os.path.abspath(os.path.expanduser(value))
    char = _unsafe_char(absolute)  # the home folder or working directory could bring one in
    if char is not None:
        raise _invalid(f"{flag}: {absolute!r} contains {char!r}, which NGINX would read as syntax.")
    return absolute


def _host_port(value: str, flag: str, wildcard: bool = False) -> str:
    """HOST:PORT (IPv6 in brackets, `*` as host when `wildcard`), returned unchanged when valid."""
    example = "e.g. 127.0.0.1:5000, [::1]:5000 or tracking.internal:5000"
    if not isinstance(value, str) or not value:
        raise _invalid(f"{flag}: HOST:PORT is required ({example}).")
    char = _unsafe_char(value)
    if char is not None:
        raise _invalid(f"{flag}: {value!r} contains {char!r}; expected HOST:PORT ({example}).")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise _invalid(f"{flag}: {value!r} is not HOST:PORT ({example}).")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _invalid(f"{flag}: {value!r} has port {port!r}; a port is a number from 1 to 65535.")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise _invalid(f"{flag}: {host!r} is not an IPv6 address.") from None
    elif ":" in host:
        raise _invalid(f"{flag}: {value!r}: an IPv6 address goes in brackets, e.g. [::1]:{port}.")
    elif not ((wildcard and host == "*") or _HOSTNAME.fullmatch(host)) or len(host) > 253:
        raise _invalid(f"{flag}: {host!r} is not a host name or IP address ({example}).")
    return value


def _port(host_port: str) -> int:
    return int(host_port.rpartition(":")[2])


def _prefix(value: str) -> str:
    if not isinstance(value, str):
        raise _invalid("--static-prefix: expected a path such as /mlflow.")
    if value in ("", "/"):
        return ""
    if not value.startswith("/"):
        raise _invalid(f"--static-prefix: {value!r} must start with '/', e.g. /mlflow.")
    prefix = value.rstrip("/")
    if not _PREFIX.fullmatch(prefix):
        raise _invalid(f"--static-prefix: {value!r} may only contain letters, digits and . _ ~ / -.")
    if any(segment in ("", ".", "..") for segment in prefix.split("/")[1:]):
        raise _invalid(f"--static-prefix: {value!r} has an empty, '.' or '..' segment.")
    return prefix


@dataclass(frozen=True)
class NginxSettings:
    upstreams: tuple[str, ...]  # HOST:PORT of each `runyard server` process
    listen: str  # ADDR:PORT
    auth: str  # basic | token | basic+token | none
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None  # mutual TLS
    static_prefix: str = ""
    insecure_no_auth: bool = False
    server_name: str = "_"
    state_dir: str = "/var/lib/runyard/nginx"  # pid file, temp folders, logs
    worker_user: str | None = None  # USER or USER:GROUP for the `user` directive
    redirect_http: str | None = None  # ADDR:PORT of a plain listener that redirects to HTTPS
    max_upload_size: str = "100g"  # client_max_body_size on artifact routes ("0": unlimited)
    login_rate: str = "30r/m"  # failed logins per client address
    # In a container: run in the foreground and log to stdout/stderr, where the runtime collects logs
    # (pid file and temp folders stay in state_dir).
    container: bool = False
    # None: one per CPU. In a container NGINX counts the node's CPUs, not the pod's share: set it there.
    worker_processes: int | None = None

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        upstreams = self.upstreams
        if isinstance(upstreams, str):
            upstreams = (upstreams,)
        upstreams = tuple(upstreams or ())
        if not upstreams:
            raise _invalid("--upstream: at least one HOST:PORT of a `runyard server` is required.")
        for upstream in upstreams:
            _host_port(upstream, "--upstream")
            if upstreams.count(upstream) > 1:
                raise _invalid(f"--upstream: {upstream} is given more than once.")
        put("upstreams", upstreams)
        if self.worker_processes is not None and not 1 <= self.worker_processes <= 256:
            raise _invalid("worker_processes: between 1 and 256.")
        _host_port(self.listen, "--listen", wildcard=True)

        if self.auth not in AUTH_MODES:
            raise _invalid(f"--auth: {self.auth!r} is not one of {', '.join(AUTH_MODES)}.")
        if self.auth == "none" and not self.insecure_no_auth:
            raise _invalid("--insecure-no-auth: --auth none lets anyone read and change every experiment "
                           "and model; add --insecure-no-auth if that is really meant (a private network).")
        if self.insecure_no_auth and self.auth != "none":
            raise _invalid(f"--insecure-no-auth: only meaningful with --auth none, not {self.auth}.")

        put("tls_cert", _path(self.tls_cert, "--tls-cert"))
        put("tls_key", _path(self.tls_key, "--tls-key"))
        put("client_ca", _path(self.client_ca, "--client-ca"))
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "--tls-key" if self.tls_key is None else "--tls-cert"
            raise _invalid(f"{missing}: TLS needs both --tls-cert and --tls-key.")
        if self.client_ca is not None and not self.tls:
            raise _invalid("--client-ca: client certificates need TLS (--tls-cert and --tls-key).")
        if self.redirect_http is not None:
            _host_port(self.redirect_http, "--redirect-http", wildcard=True)
            if not self.tls:
                raise _invalid("--redirect-http: redirecting to HTTPS needs TLS (--tls-cert and --tls-key).")
            if _port(self.redirect_http) == _port(self.listen):
                raise _invalid(f"--redirect-http: {self.redirect_http} uses the port of --listen "
                               f"{self.listen}; the plain-HTTP listener needs a port of its own.")

        put("static_prefix", _prefix(self.static_prefix))
        if not isinstance(self.server_name, str) or not _SERVER_NAME.fullmatch(self.server_name):
            raise _invalid(f"--server-name: {self.server_name!r} is not a host name (or _ for any name).")
        state_dir = _path(self.state_dir, "--state-dir")
        if state_dir == "/":
            raise _invalid("--state-dir: / is not a state directory.")
        put("state_dir", state_dir)
        if self.worker_user is not None:
            parts = self.worker_user.split(":") if isinstance(self.worker_user, str) else []
            if not 1 <= len(parts) <= 2 or not all(_ACCOUNT.fullmatch(p) for p in parts):
                raise _invalid(f"--worker-user: {self.worker_user!r} is not USER or USER:GROUP.")
        if not isinstance(self.max_upload_size, str) or not _SIZE.fullmatch(self.max_upload_size):
            raise _invalid(f"--max-upload-size: {self.max_upload_size!r} is not an NGINX size "
                           "such as 100g, 512m or 0 (unlimited).")
        if not isinstance(self.login_rate, str) or not _RATE.fullmatch(self.login_rate):
            raise _invalid(f"--login-rate: {self.login_rate!r} is not an NGINX rate such as 30r/m or 1r/s.")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


# The Authorization schemes each mode lets through to the server, and the challenges of its 401s.
_SCHEMES = {"basic": "basic", "token": "bearer", "basic+token": "(basic|bearer)"}
_CHALLENGES = {"basic": ('Basic realm="runyard"',), "token": ('Bearer realm="runyard"',),
               "basic+token": ('Basic realm="runyard"', 'Bearer realm="runyard"'), "none": ()}


def template_values(settings: NginxSettings) -> dict:
    """Everything nginx.conf.j2 needs, each value already validated by NginxSettings."""
    s = settings
    prefix = s.static_prefix
    user_var = "" if s.auth == "none" else "$runyard_user"  # set by auth_request_set
    tls_port = _port(s.listen)
    return {
        "worker_user": s.worker_user.replace(":", " ") if s.worker_user else None,
        "container": bool(s.container),
        "worker_processes": s.worker_processes or "auto",
        "state_dir": s.state_dir,
        "upstreams": s.upstreams,
        "listen": s.listen,
        "server_name": s.server_name,
        "auth": s.auth,
        "auth_schemes": _SCHEMES.get(s.auth, ""),
        "challenges": _CHALLENGES[s.auth],
        "tls": s.tls,
        "tls_cert": s.tls_cert,
        "tls_key": s.tls_key,
        "client_ca": s.client_ca,
        "ssl_ciphers": SSL_CIPHERS,
        "prefix": prefix,
        "user_var": user_var or '""',
        "log_user": "$runyard_log_user" if user_var else "-",
        "login_rate": s.login_rate,
        "login_burst": LOGIN_BURST,
        "api_body_limit": API_BODY_LIMIT,
        "max_upload_size": s.max_upload_size,
        "artifact_locations": (
            f"{prefix}/api/2.0/mlflow-artifacts/",
            f"{prefix}/ajax-api/2.0/mlflow-artifacts/",
            f"= {prefix}/get-artifact",
            f"= {prefix}/model-versions/get-artifact",
        ),
        "redirect_listen": s.redirect_http,
        "https_port_suffix": "" if tls_port == 443 else f":{tls_port}",
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _template_location(exc: BaseException, fallback: str) -> str:
    """`name line N` of the innermost template frame in a Jinja error's traceback."""
    where = fallback
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            where = f"{Path(filename).name} line {tb.tb_lineno}"
        tb = tb.tb_next
    return where


def render_template(name: str, **values) -> str:
    """One template from nginx/ with `values`; a value the template needs but did not get is an error
    naming it, never an empty string."""
    try:
        return _environment().get_template(name).render(**values)
    except jinja2.TemplateNotFound as exc:
        raise RunyardError(f"NGINX template {exc.name!r} not found in {TEMPLATES}.",
                           "INTERNAL_ERROR") from None
    except jinja2.UndefinedError as exc:
        missing = re.match(r"'([^']+)' is undefined", exc.message or "")
        what = f"the value {missing.group(1)!r}" if missing else f"a value ({exc.message})"
        raise RunyardError(f"NGINX template {_template_location(exc, name)} (rendering {name}) needs "
                           f"{what}, which was not given.", "INTERNAL_ERROR") from None
    except jinja2.TemplateSyntaxError as exc:
        raise RunyardError(f"NGINX template {exc.name or name} line {exc.lineno}: {exc.message}",
                           "INTERNAL_ERROR") from None


def render(settings: NginxSettings) -> str:
    """The complete nginx.conf for `settings`."""
    return render_template("nginx.conf.j2", **template_values(settings))


def find_nginx() -> str:
    """The nginx binary: $RUNYARD_NGINX, else `nginx` on PATH, else /usr/sbin/nginx."""
    configured = os.environ.get("RUNYARD_NGINX")
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return configured
        raise RunyardError(f"RUNYARD_NGINX={configured} is not an executable file.", "INVALID_STATE")
    found = shutil.which("nginx")
    if found:
        return found
    if os.path.isfile(FALLBACK_NGINX) and os.access(FALLBACK_NGINX, os.X_OK):
        return FALLBACK_NGINX
    raise RunyardError(f"nginx is not installed (not on PATH, not {FALLBACK_NGINX}). Install it "
                       "(Debian/Ubuntu: apt-get install nginx) or point RUNYARD_NGINX at the binary.",
                       "INVALID_STATE")


_LOG_PREFIX = re.compile(r"^(?:nginx: )?(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(\[\w+\]) (?:\d+#\d+: )?")


def _nginx_messages(output: str) -> list[str]:
    """nginx -t's complaint lines, without the timestamp and pid noise; every line when none matches."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    tidy = [_LOG_PREFIX.sub(r"\1 ", line) for line in lines]
    complaints = [line for line in tidy if re.match(r"\[(emerg|alert|crit|error)\]", line)]
    return complaints or tidy


def check(config_path: str | os.PathLike, _shown_as: str | None = None) -> str:
    """Validates a configuration with `nginx -t`; returns nginx's report, or raises RunyardError with
    nginx's complaint. It also creates the temp folders, logs and an empty pid file the configuration
    names, as nginx itself does, and fails when their folder does not exist."""
    path = os.path.abspath(config_path)
    shown = _shown_as or path
    if not os.path.isfile(path):
        raise _invalid(f"{shown}: no such configuration file.")
    command = [find_nginx(), "-t", "-c", path]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunyardError(f"nginx -t did not finish within {CHECK_TIMEOUT_S} s "
                           "(an upstream host name that does not resolve?).", "INVALID_STATE") from None
    except OSError as exc:
        raise RunyardError(f"cannot run {command[0]}: {exc.strerror}", "INVALID_STATE") from None
    output = (done.stderr + done.stdout).replace(path, shown).strip()
    if done.returncode != 0:
        detail = "; ".join(_nginx_messages(output)) or f"exit code {done.returncode}"
        raise _invalid(f"nginx rejects {shown}: {detail}")
    return output


@dataclass(frozen=True)
class _Worker:
    """The account nginx workers run as, when it is not root (only a root master switches users)."""

    name: str
    uid: int
    gid: int
    gids: frozenset[int]


def _worker(settings: NginxSettings) -> _Worker | None:
    if os.geteuid() != 0:
        return None  # `user` is ignored: the workers are us
    user, _, group = (settings.worker_user or NGINX_DEFAULT_USER).partition(":")
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise _invalid(f"--worker-user: there is no user {user!r} on this host.") from None
    gid = account.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise _invalid(f"--worker-user: there is no group {group!r} on this host.") from None
    if account.pw_uid == 0:
        return None
    # nginx calls setgid(group) and initgroups(user): the user's supplementary groups count too
    return _Worker(user, account.pw_uid, gid, frozenset(os.getgrouplist(user, gid)) | {gid})


def _searchable(folder: Path, worker: _Worker) -> bool:
    """Whether the mode bits of `folder` let `worker` pass through it, the way the kernel picks owner,
    group or other bits (ACLs aside)."""
    st = folder.stat()
    if st.st_uid == worker.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in worker.gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def _blocked_at(folder: Path, worker: _Worker) -> Path | None:
    """The first folder on the way to `folder` (itself included) the worker cannot pass, or None."""
    return next((f for f in [*reversed(folder.parents), folder] if not _searchable(f, worker)), None)


def check_worker_access(settings: NginxSettings) -> None:
    """What `nginx -t` cannot see: the workers (not the master) write request bodies into the temp
    folders. A miss there is a 500 on every large request, so it is refused here instead."""
    worker = _worker(settings)
    advice = "give that user access (chmod/chown) or choose another --worker-user"
    state = Path(settings.state_dir)
    blocked = worker and _blocked_at(state, worker)
    if blocked:
        raise _invalid(f"--state-dir: nginx workers run as {worker.name} and cannot reach their temp "
                       f"folders in {state} (stopped at {blocked}); {advice}.")


def prepare_state_dir(settings: NginxSettings) -> Path:
    """Creates the state directory (0700) and its temp folders when missing. Run as root, a directory
    created here belongs to the worker user: the workers must reach the temp folders inside it (nginx
    hands the temp folders to them, not their parent)."""
    state = Path(settings.state_dir)
    worker = _worker(settings)
    created = []
    try:
        if not state.is_dir():
            state.parent.mkdir(parents=True, exist_ok=True)
            state.mkdir(mode=0o700)
            created.append(state)
        for name in TEMP_DIRS:
            if not (state / name).is_dir():
                (state / name).mkdir(mode=0o700)
                created.append(state / name)
        for path in created:
            if worker is not None:
                os.chown(path, worker.uid, worker.gid)
    except FileExistsError as exc:
        raise _invalid(f"--state-dir: {exc.filename} exists and is not a directory.") from None
    except OSError as exc:
        raise _invalid(f"--state-dir: cannot create {exc.filename or state}: {exc.strerror}.") from None
    return state


def write(settings: NginxSettings, output_path: str | os.PathLike, validate: bool = True) -> str:
    """Renders `settings` to `output_path` (0644) atomically. With `validate` (on the host that runs
    nginx) it is first checked with `nginx -t` and `check_worker_access`; on any failure nothing new is
    left behind and an existing file is untouched. Without, the file is only rendered (another host)."""
    output = Path(os.path.abspath(os.path.expanduser(output_path)))
    if output.is_dir():
        raise _invalid(f"{output} is a directory; give the path of the configuration file.")
    if not output.parent.is_dir():
        raise _invalid(f"{output.parent} does not exist; create it first.")
    text = render(settings)
    if validate:
        prepare_state_dir(settings)
        check_worker_access(settings)
    else:
        try:  # may well be impossible here: the configuration can be meant for another host
            prepare_state_dir(settings)
        except RunyardError:
            pass
    try:
        # 0644: paths only, no secrets, and nginx may run as another user
        replace_atomically(output, text.encode(), prepare=lambda fd: os.fchmod(fd, 0o644),
                           check=(lambda temp: check(temp, _shown_as=str(output))) if validate else None)
    except FolderNotWritable as exc:
        raise _invalid(f"cannot write in {output.parent}: {exc.strerror}.") from None
    return str(output)

