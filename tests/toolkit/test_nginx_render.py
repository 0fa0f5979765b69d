"""toolkit.nginx: settings validation, the rendered nginx.conf checked by the real `nginx -t`, and the
behaviour of a real running nginx in front of a small Python backend (auth modes through auth_request,
the forwarded user, static prefix, streaming and body limits, the failed-login rate limit, TLS, mutual
TLS, redirect, reload)."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from helpers.nginx import NginxProcess
from helpers.ports import free_port, port_open, wait_for

from server.errors import RunyardError
from toolkit import nginx
from toolkit.certs import selfsigned
from toolkit.nginx import NginxSettings, check, render, render_template, template_values, write

TOKEN = "ryt_good-token-123"
TOKEN_USER = "tina"
USER, PASSWORD = "alice", "wonder land"
MIB = 2**20
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "SAMEORIGIN",
                    "Referrer-Policy": "same-origin"}
AUTH_MODES = ("basic", "token", "basic+token")
# The Authorization schemes each mode lets through to the server, and the challenges of its 401s.
SCHEMES = {"basic": {"basic"}, "token": {"bearer"}, "basic+token": {"basic", "bearer"}}
CHALLENGES = {"basic": ['Basic realm="runyard"'], "token": ['Bearer realm="runyard"'],
              "basic+token": ['Basic realm="runyard"', 'Bearer realm="runyard"']}


def basic_header(user=USER, password=PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# --- a backend standing in for `runyard server` -------------------------------------------------------
class Backend:
    """Answers every path with JSON describing what it received (path, X-Forwarded-User, body size, ...)
    and implements GET /_runyard/auth like the real server (server/api/auth.py): USER/PASSWORD as Basic
    and TOKEN as Bearer (scheme in any case) get 200 with `X-Runyard-User`, anything else a bare 401.
    It records every request, the Authorization header included, so tests see what reached it."""

    def __init__(self, name: str):
        self.name = name
        self.requests: list[dict] = []  # everything but /_runyard/auth
        self.auth_calls: list[dict] = []
        # who the server names for an accepted USER or TOKEN_USER; a test may rename them to prove that
        # nginx forwards the server's name, not one it derives from the Authorization header itself
        self.names: dict[str, str] = {}
        self.got_first_mib = threading.Event()  # set while a body is still arriving, after 1 MiB
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive with nginx's upstream pool

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # headers and body leave in two writes: without this, Nagle's algorithm and nginx's
                # delayed ACK add 40 ms to every answer
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _body_size(self) -> int:
                size = 0
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while True:
                        length = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if length == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return size
                        remaining = length
                        while remaining:
                            remaining -= len(self.rfile.read(min(remaining, 256 * 1024)))
                        self.rfile.readline()
                        size += length
                        if size >= MIB:
                            backend.got_first_mib.set()
                remaining = int(self.headers.get("Content-Length") or 0)
                while remaining:
                    chunk = self.rfile.read(min(remaining, 256 * 1024))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    size += len(chunk)
                    if size >= MIB:
                        backend.got_first_mib.set()
                return size

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_one(self):
                size = self._body_size()
                path = self.path.split("?")[0]
                authorization = self.headers.get("Authorization")
                if path.endswith("/_runyard/auth"):
                    backend.auth_calls.append({"method": self.command, "path": self.path, "size": size,
                                               "authorization": authorization,
                                               "forwarded_user": self.headers.get("X-Forwarded-User"),
                                               "content_length": self.headers.get("Content-Length"),
                                               "transfer_encoding": self.headers.get("Transfer-Encoding")})
                    user = backend.authenticate(authorization) if self.command == "GET" else None
                    if user is None:
                        self._send(401)  # bare, like the server: the challenges are nginx's
                    else:
                        self._send(200, headers={"X-Runyard-User": user, "Cache-Control": "no-store"})
                    return
                seen = {"backend": backend.name, "method": self.command, "path": self.path,
                        "user": self.headers.get("X-Forwarded-User"), "size": size,
                        "request_id": self.headers.get("X-Request-ID"),
                        "forwarded_proto": self.headers.get("X-Forwarded-Proto"),
                        "host": self.headers.get("Host")}
                backend.requests.append({**seen, "authorization": authorization})
                # like the real server on artifact answers: nginx must keep one copy, its own
                self._send(200, json.dumps(seen).encode(), {"Content-Type": "application/json",
                                                            "X-Content-Type-Options": "nosniff"})

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def authenticate(self, authorization: str | None) -> str | None:
        scheme, _, credential = (authorization or "").partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        user = None
        if scheme == "bearer" and credential == TOKEN:
            user = TOKEN_USER
        elif scheme == "basic" and credential == basic_header().partition(" ")[2]:
            user = USER
        return self.names.get(user, user) if user else None

    def reset(self):
        self.requests.clear()
        self.auth_calls.clear()
        self.names.clear()
        self.got_first_mib.clear()

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def authorizations(self) -> list[str | None]:
        """Every Authorization header that reached this backend, on any path."""
        return [c["authorization"] for c in self.auth_calls] + [r["authorization"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def backends():
    started = [Backend("one"), Backend("two")]
    yield started
    for backend in started:
        backend.close()


@pytest.fixture
def backend(backends):
    for b in backends:
        b.reset()
    return backends[0]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Development certificates: a CA, a server certificate and a client certificate."""
    return selfsigned(tmp_path_factory.mktemp("material") / "tls", hosts=("localhost", "127.0.0.1"),
                      client="robot")


def settings_for(material, tmp_path, **overrides) -> NginxSettings:
    # as root, `user root`: workers running as nobody could not enter pytest's 0700 temp folders
    values = {"upstreams": ("127.0.0.1:5000",), "listen": f"127.0.0.1:{free_port()}", "auth": "basic",
              "state_dir": str(tmp_path / "state"), "worker_user": "root" if os.geteuid() == 0 else None}
    values.update(overrides)
    return NginxSettings(**values)


def tls_options(material, mode: str) -> dict:
    """Settings for "plain", "tls", "mtls" and "tls+redirect"."""
    if mode == "plain":
        return {}
    options = {"tls_cert": material["cert"], "tls_key": material["key"]}
    if mode == "mtls":
        options["client_ca"] = material["ca"]
    if mode == "tls+redirect":
        options["redirect_http"] = f"127.0.0.1:{free_port()}"
    return options


class Proxy:
    def __init__(self, settings: NginxSettings, process: NginxProcess, conf: Path):
        self.settings, self.process, self.conf = settings, process, conf
        scheme = "https" if settings.tls else "http"
        host = "localhost" if settings.tls else "127.0.0.1"
        self.port = int(settings.listen.rpartition(":")[2])
        self.base = f"{scheme}://{host}:{self.port}{settings.static_prefix}"

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("allow_redirects", False)
        kwargs.setdefault("timeout", 10)
        return requests.get(self.base + path, **kwargs)

    def access_log(self) -> str:
        return (Path(self.settings.state_dir) / "access.log").read_text()


@pytest.fixture
def proxy(material, tmp_path, backend):
    """factory(**settings overrides) -> Proxy: a running nginx with the rendered configuration in front
    of the backend."""
    started: list[NginxProcess] = []

    def start(**overrides) -> Proxy:
        overrides.setdefault("upstreams", (backend.address,))
        overrides.setdefault("state_dir", str(tmp_path / f"state{len(started)}"))
        settings = settings_for(material, tmp_path, **overrides)
        conf = Path(write(settings, tmp_path / f"nginx{len(started)}.conf"))
        process = NginxProcess()
        started.append(process)
        process.start(conf)
        return Proxy(settings, process, conf)

    yield start
    for process in started:
        process.stop()


def basic(user=USER, password=PASSWORD) -> dict:
    return {"auth": (user, password)}


def bearer(token=TOKEN) -> dict:
    return {"headers": {"Authorization": f"Bearer {token}"}}


def authorization(value: str) -> dict:
    return {"headers": {"Authorization": value}}


def with_headers(options: dict, **headers) -> dict:
    merged = dict(options)
    merged["headers"] = {**options.get("headers", {}), **{k.replace("_", "-"): v for k, v in headers.items()}}
    return merged


def challenges(response: requests.Response) -> list[str]:
    """Every WWW-Authenticate header line, as sent (requests would join them with ", ")."""
    return response.raw.headers.getlist("WWW-Authenticate")


def complaints(process: NginxProcess) -> list[str]:
    """The error log's [warn] lines and worse."""
    return [line for line in process.error_log().splitlines()
            if re.search(r"\[(warn|error|crit|alert|emerg)\]", line)]


def blocks(conf: str, keyword: str) -> list[tuple[str, str]]:
    """(header, body) of every `keyword ... { ... }` block, nested braces included."""
    found = []
    for match in re.finditer(rf"^\s*{keyword}\b([^{{;]*)\{{", conf, re.MULTILINE):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(conf[i], 0)
            i += 1
        found.append((match.group(1).strip(), conf[match.end():i - 1]))
    return found


def directives(conf: str) -> str:
    """The configuration without its comments (which name auth_basic, htpasswd, ... to explain why not)."""
    return re.sub(r"#[^\n]*", "", conf)


# --- every combination passes `nginx -t` ---------------------------------------------------------------
@pytest.mark.parametrize("upstream_count", [1, 2])
@pytest.mark.parametrize("prefix", ["", "/mlflow"])
@pytest.mark.parametrize("tls_mode", ["plain", "tls", "mtls", "tls+redirect"])
@pytest.mark.parametrize("auth", ["basic", "token", "basic+token", "none"])
def test_every_combination_renders_and_passes_nginx_check(material, tmp_path, auth, tls_mode, prefix,
                                                          upstream_count):
    settings = settings_for(material, tmp_path, auth=auth, static_prefix=prefix,
                            insecure_no_auth=auth == "none",
                            upstreams=tuple(f"127.0.0.1:{5000 + i}" for i in range(upstream_count)),
                            **tls_options(material, tls_mode))
    conf_path = write(settings, tmp_path / "nginx.conf")
    assert "test is successful" in check(conf_path)
    conf = Path(conf_path).read_text()
    bare = directives(conf)

    for upstream in settings.upstreams:
        assert f"server {upstream};" in conf
    # Every proxied location sets every forwarded header itself (no reliance on inheritance).
    locations = dict(blocks(bare, "location"))
    proxied = [(header, body) for header, body in locations.items() if "proxy_pass" in body]
    assert len(proxied) == 7 + (auth != "none")
    for header, body in proxied:
        for name in ("Host $host", "X-Real-IP $remote_addr", "X-Forwarded-For $proxy_add_x_forwarded_for",
                     "X-Forwarded-Proto $scheme", "X-Request-ID $request_id", "X-Forwarded-User ",
                     'Connection ""'):
            assert f"proxy_set_header {name}" in body, (header, name)
        assert "proxy_pass http://runyard;" in body  # the path goes through unchanged
        open_location = header in (f"= {prefix}/health", f"= {prefix}/ready", f"= {prefix}/_runyard/auth")
        protected = not open_location and auth != "none"
        # the user is the one the server's auth answer named, and only where that answer was asked for
        assert ('X-Forwarded-User "";' in body) == (not protected), header
        assert ("X-Forwarded-User $runyard_user;" in body) == protected, header
        assert (f"auth_request {prefix}/_runyard/auth;" in body) == protected, header
        assert ("auth_request_set $runyard_user $upstream_http_x_runyard_user;" in body) == protected, header
        assert ("error_page 401 = @runyard_denied;" in body) == protected, header
    # NGINX holds no credential and checks none itself
    for gone in ("auth_basic", "$remote_user", "satisfy", "htpasswd"):
        assert gone not in bare, gone
    if auth == "none":
        assert "auth_request" not in bare and "@runyard_denied" not in bare and "limit_req" not in bare
    else:
        auth_location = locations[f"= {prefix}/_runyard/auth"]
        assert "internal;" in auth_location and "proxy_pass_request_body off;" in auth_location
        denied = locations["@runyard_denied"]
        assert re.findall(r"add_header WWW-Authenticate '([^']*)' always;", denied) == CHALLENGES[auth]
    log_format = re.search(r"log_format runyard (.*?);", conf, re.DOTALL).group(1)
    assert "$request " not in log_format and "$request_uri" not in log_format and "$args" not in log_format
    assert "$http_" not in log_format and "$request_method $uri $server_protocol" in log_format
    assert ("$runyard_log_user" in log_format) == (auth != "none")
    assert ("add_header Strict-Transport-Security" in conf) == (tls_mode != "plain")
    assert ("ssl_verify_client on;" in conf) == (tls_mode == "mtls")
    assert len(blocks(conf, "server")) == 1 + (tls_mode == "tls+redirect")


@pytest.mark.parametrize("listen, upstream", [("*:{port}", "localhost:5000"), ("[::1]:{port}", "[::1]:5000"),
                                              ("localhost:{port}", "127.0.0.1:5000"),
                                              ("0.0.0.0:{port}", "localhost:5001")])
def test_address_forms_pass_nginx_check(material, tmp_path, listen, upstream):
    settings = settings_for(material, tmp_path, listen=listen.format(port=free_port()),
                            upstreams=(upstream,), **tls_options(material, "tls"))
    assert "test is successful" in check(write(settings, tmp_path / "nginx.conf"))


def test_redirect_leaves_out_port_443(material, tmp_path):
    settings = settings_for(material, tmp_path, listen="0.0.0.0:443", redirect_http="0.0.0.0:80",
                            **tls_options(material, "tls"))
    assert "return 301 https://$host$request_uri;" in render(settings)
    settings = settings_for(material, tmp_path, listen="[::]:8443", redirect_http="[::]:8080",
                            **tls_options(material, "tls"))
    conf = render(settings)
    assert "return 301 https://$host:8443$request_uri;" in conf and "listen [::]:8443 ssl http2;" in conf


# --- templates -------------------------------------------------------------------------------------------
def test_missing_template_value_is_an_error_naming_it(material, tmp_path):
    values = template_values(settings_for(material, tmp_path))
    del values["state_dir"]
    with pytest.raises(RunyardError) as caught:
        render_template("nginx.conf.j2", **values)
    assert "'state_dir'" in caught.value.message and "nginx.conf.j2" in caught.value.message

    values = template_values(settings_for(material, tmp_path))
    del values["listen"]  # used by the included server template
    with pytest.raises(RunyardError) as caught:
        render_template("nginx.conf.j2", **values)
    assert "'listen'" in caught.value.message and "server.j2" in caught.value.message
    assert "Traceback" not in caught.value.message

    with pytest.raises(RunyardError, match="no-such.j2"):
        render_template("no-such.j2")


def test_templates_ship_in_the_nginx_package():
    assert (nginx.TEMPLATES / "__init__.py").is_file()
    assert {p.name for p in nginx.TEMPLATES.glob("*.j2")} >= {"nginx.conf.j2", "server.j2", "macros.j2"}


def test_api_body_limit_matches_the_server():
    from server.api.message import MAX_JSON_BODY

    assert nginx.API_BODY_LIMIT == f"{MAX_JSON_BODY // MIB}m"


# --- settings validation -------------------------------------------------------------------------------
TLS = {"tls_cert": "/etc/tls/cert.pem", "tls_key": "/etc/tls/key.pem"}
BAD_SETTINGS = [
    ({"upstreams": ()}, "--upstream"),
    ({"upstreams": ("localhost",)}, "--upstream"),
    ({"upstreams": ("127.0.0.1:0",)}, "--upstream"),
    ({"upstreams": ("127.0.0.1:65536",)}, "--upstream"),
    ({"upstreams": ("127.0.0.1:http",)}, "--upstream"),
    ({"upstreams": ("::1:5000",)}, "--upstream"),
    ({"upstreams": ("[not-v6]:5000",)}, "--upstream"),
    ({"upstreams": ("a:5000", "a:5000")}, "--upstream"),
    ({"upstreams": ("127.0.0.1:5000; server evil:80",)}, "--upstream"),
    ({"upstreams": ("127.0.0.1:5000}",)}, "--upstream"),
    ({"listen": "8080"}, "--listen"),
    ({"listen": "127.0.0.1:443 ssl"}, "--listen"),
    ({"listen": "127.0.0.1:99999"}, "--listen"),
    ({"auth": "oauth"}, "--auth"),
    ({"auth": "none"}, "--insecure-no-auth"),
    ({"auth": "token", "insecure_no_auth": True}, "--insecure-no-auth"),
    ({"tls_cert": "/etc/tls/cert.pem"}, "--tls-key"),
    ({"tls_key": "/etc/tls/key.pem"}, "--tls-cert"),
    ({"client_ca": "/etc/tls/ca.pem"}, "--client-ca"),
    ({"redirect_http": "0.0.0.0:80"}, "--redirect-http"),
    ({"redirect_http": "0.0.0.0:8443", "listen": "127.0.0.1:8443", **TLS}, "--redirect-http"),
    ({"redirect_http": "0.0.0.0:80;", **TLS}, "--redirect-http"),
    ({"static_prefix": "mlflow"}, "--static-prefix"),
    ({"static_prefix": "/ml flow"}, "--static-prefix"),
    ({"static_prefix": "/a/../b"}, "--static-prefix"),
    ({"static_prefix": "/a//b"}, "--static-prefix"),
    ({"static_prefix": "/x;return 200"}, "--static-prefix"),
    ({"static_prefix": "/$host"}, "--static-prefix"),
    ({"static_prefix": "/x{"}, "--static-prefix"),
    # every path that reaches the configuration goes through the same check
    ({"state_dir": "/var/lib/run yard"}, "--state-dir"),
    ({"tls_cert": "/etc/x;\n}", "tls_key": "/etc/key.pem"}, "--tls-cert"),
    ({"state_dir": "/var/lib/x#y"}, "--state-dir"),
    ({"client_ca": "/etc/x\\y", **TLS}, "--client-ca"),
    ({"tls_cert": "/etc/cert.pem", "tls_key": "/etc/x\x00y"}, "--tls-key"),
    ({"tls_cert": '/etc/cert.pem"', "tls_key": "/etc/key.pem"}, "--tls-cert"),
    ({"tls_cert": "/etc/cert.pem", "tls_key": "/etc/key{.pem"}, "--tls-key"),
    ({"client_ca": "/etc/ca'.pem", **TLS}, "--client-ca"),
    ({"state_dir": "/var/lib/x$y"}, "--state-dir"),
    ({"state_dir": "/var/lib/x\ty"}, "--state-dir"),
    ({"state_dir": "/"}, "--state-dir"),
    ({"server_name": "a.example; return 200"}, "--server-name"),
    ({"server_name": "a.example b.example"}, "--server-name"),
    ({"server_name": ""}, "--server-name"),
    ({"worker_user": "root; daemon off"}, "--worker-user"),
    ({"worker_user": "a:b:c"}, "--worker-user"),
    ({"max_upload_size": "10 g"}, "--max-upload-size"),
    ({"max_upload_size": "1t"}, "--max-upload-size"),
    ({"max_upload_size": "10g;"}, "--max-upload-size"),
    ({"login_rate": "30/m"}, "--login-rate"),
    ({"login_rate": "30r/m burst=1000"}, "--login-rate"),
    ({"worker_processes": 0}, "worker_processes"),
]


@pytest.mark.parametrize("overrides, flag", BAD_SETTINGS, ids=[repr(o) for o, _ in BAD_SETTINGS])
def test_bad_settings_name_the_flag(material, tmp_path, overrides, flag):
    with pytest.raises(RunyardError) as caught:
        settings_for(material, tmp_path, **overrides)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message.startswith(flag), caught.value.message


def test_settings_hold_no_credential_file(material, tmp_path):
    """Passwords are the server's business (`runyard server --htpasswd`): NGINX is given no file."""
    assert "htpasswd" not in {field.name for field in dataclasses.fields(NginxSettings)}
    with pytest.raises(TypeError, match="htpasswd"):
        settings_for(material, tmp_path, htpasswd="/etc/runyard/htpasswd")


def test_settings_are_normalised(material, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_for(material, tmp_path, static_prefix="/mlflow/",
                            upstreams=["[::1]:5000", "tracking.internal:5001"], listen="*:8080",
                            state_dir="state", worker_user="www-data:www-data")
    assert settings.static_prefix == "/mlflow"
    assert settings.state_dir == str(tmp_path / "state")
    assert settings.upstreams == ("[::1]:5000", "tracking.internal:5001")
    assert "user www-data www-data;" in render(settings)
    assert settings_for(material, tmp_path, static_prefix="/").static_prefix == ""
    assert settings_for(material, tmp_path, upstreams="127.0.0.1:5000").upstreams == ("127.0.0.1:5000",)


# --- write / check / find_nginx ----------------------------------------------------------------------
def test_write_creates_state_dir_and_a_readable_config(material, tmp_path):
    settings = settings_for(material, tmp_path, state_dir=str(tmp_path / "deep" / "state"))
    path = Path(write(settings, tmp_path / "nginx.conf"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    state = tmp_path / "deep" / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert {p.name for p in state.iterdir()} >= set(nginx.TEMP_DIRS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "nginx.conf"]  # no temp file left


def test_write_refused_by_nginx_leaves_the_old_file(material, tmp_path):
    target = tmp_path / "nginx.conf"
    target.write_text("# the configuration in service\n")
    settings = settings_for(material, tmp_path, tls_cert=str(tmp_path / "missing-cert.pem"),
                            tls_key=material["key"])
    with pytest.raises(RunyardError) as caught:
        write(settings, target)
    message = caught.value.message
    assert "missing-cert.pem" in message and str(target) in message and ".tmp" not in message, message
    assert "\n" not in message and "Traceback" not in message
    assert target.read_text() == "# the configuration in service\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nginx.conf", "state"]

    write(settings, tmp_path / "unchecked.conf", validate=False)  # rendered for another host
    assert "missing-cert.pem" in (tmp_path / "unchecked.conf").read_text()


def test_write_needs_an_existing_folder(material, tmp_path):
    with pytest.raises(RunyardError, match="does not exist"):
        write(settings_for(material, tmp_path), tmp_path / "no-such-folder" / "nginx.conf")


def test_check_reports_nginx_complaints(tmp_path):
    broken = tmp_path / "broken.conf"
    broken.write_text("events {}\nhttp { server { listen 127.0.0.1:1; location / { retrun 404; } } }\n")
    with pytest.raises(RunyardError) as caught:
        check(broken)
    assert 'unknown directive "retrun"' in caught.value.message and str(broken) in caught.value.message
    with pytest.raises(RunyardError, match="no such configuration file"):
        check(tmp_path / "absent.conf")


def test_check_needs_the_state_dir(material, tmp_path):
    """nginx -t opens the pid file and logs the configuration names: their folder must exist (write
    creates it; check alone does not)."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(settings_for(material, tmp_path, state_dir=str(tmp_path / "absent"))))
    with pytest.raises(RunyardError, match="absent"):
        check(conf)


@pytest.mark.parametrize("tls_mode", ["plain", "tls"])
def test_container_mode_runs_in_the_foreground_and_logs_to_stdout(material, tmp_path, backend, tls_mode):
    """The Kubernetes sidecar (infra/k8s): nginx is the container's main process and its logs go to the
    container runtime; only the pid file and temp folders stay in the state directory."""
    settings = settings_for(material, tmp_path, auth="token", container=True, upstreams=(backend.address,),
                            **tls_options(material, tls_mode))
    conf_path = write(settings, tmp_path / "nginx.conf")
    assert "test is successful" in check(conf_path)
    bare = directives(Path(conf_path).read_text())
    for line in ("daemon off;", "error_log stderr warn;", "access_log /dev/stdout runyard;",
                 f"pid {settings.state_dir}/nginx.pid;"):
        assert re.search(rf"^\s*{re.escape(line)}$", bare, re.MULTILINE), line
    assert "error.log" not in bare and "access.log" not in bare
    assert "daemon" not in directives(render(dataclasses.replace(settings, container=False)))

    # No -g 'daemon off;': the configuration alone keeps nginx in the foreground.
    proc = subprocess.Popen([nginx.find_nginx(), "-c", conf_path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        port = int(settings.listen.rpartition(":")[2])
        wait_for(lambda: proc.poll() is not None or port_open(port), 10)
        assert proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        scheme = "https" if settings.tls else "http"
        answer = requests.get(f"{scheme}://localhost:{port}/health", timeout=10, verify=material["ca"])
        assert answer.status_code == 200 and answer.json()["path"] == "/health"
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    assert re.search(r'"GET /health HTTP/\S+" 200 ', out), out  # the access log, on stdout
    assert not (Path(settings.state_dir) / "access.log").exists()
    assert not (Path(settings.state_dir) / "error.log").exists()


def test_find_nginx(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNYARD_NGINX", str(tmp_path / "nginx"))
    with pytest.raises(RunyardError, match="RUNYARD_NGINX"):
        nginx.find_nginx()
    monkeypatch.delenv("RUNYARD_NGINX")
    monkeypatch.setattr(nginx.shutil, "which", lambda name: None)
    monkeypatch.setattr(nginx, "FALLBACK_NGINX", str(tmp_path / "sbin" / "nginx"))
    with pytest.raises(RunyardError, match="apt-get install nginx"):
        nginx.find_nginx()


# --- a real nginx in front of the backend --------------------------------------------------------------
def assert_security_headers(response: requests.Response, tls: bool = False):
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, response.status_code, response.headers)
    assert ("Strict-Transport-Security" in response.headers) == tls
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers.get("X-Request-ID", "")), response.headers


def assert_denied(response: requests.Response, auth: str, what=None):
    """A refused login: 401, exactly the mode's challenges (one line each), the security headers."""
    assert response.status_code == 401, (what, response.status_code, response.text)
    assert challenges(response) == CHALLENGES[auth], (what, challenges(response))
    assert "X-Runyard-User" not in response.headers
    assert_security_headers(response)


def test_basic_auth(proxy, backend):
    p = proxy(auth="basic")
    for probe in ("/health", "/ready"):
        answer = p.get(probe, **with_headers(basic(), X_Forwarded_User="mallory"))
        assert answer.status_code == 200 and answer.json()["user"] is None  # open, and no user forwarded
        assert p.get(probe).status_code == 200
    assert backend.auth_calls == []  # probes cost no credential check
    for path in ("/version", "/api/2.0/mlflow/experiments/search", "/ajax-api/2.0/mlflow/runs/get",
                 "/api/2.0/mlflow-artifacts/artifacts/a.txt", "/get-artifact", "/no/such/path", "/"):
        assert_denied(p.get(path), "basic", path)
    assert p.get("/version", **basic(password="wrong")).status_code == 401
    assert [c["authorization"] for c in backend.auth_calls] == [basic_header(password="wrong")]
    assert p.get("/version", **bearer()).status_code == 401  # no tokens in basic mode
    assert len(backend.auth_calls) == 1  # nginx refused the token without asking

    ok = p.get("/api/2.0/mlflow/experiments/search?max_results=5",
               **with_headers(basic(), X_Forwarded_User="mallory"))
    assert ok.status_code == 200, ok.text
    seen = ok.json()
    assert seen["user"] == USER and seen["path"] == "/api/2.0/mlflow/experiments/search?max_results=5"
    assert seen["request_id"] == ok.headers["X-Request-ID"] and seen["forwarded_proto"] == "http"
    assert_security_headers(ok)
    assert ok.headers.get("X-Content-Type-Options") == "nosniff"  # one copy, not "nosniff, nosniff"
    assert "X-Runyard-User" not in ok.headers  # the auth answer's headers stay inside nginx
    call = backend.auth_calls[-1]
    # the check is a bodiless GET of the auth path with the client's credential and no user of its own
    assert call["method"] == "GET" and call["path"] == "/_runyard/auth" and call["size"] == 0
    assert call["authorization"] == basic_header() and call["forwarded_user"] is None

    for path in ("/_runyard/auth", "/_runyard/anything", "/_runyard/"):
        assert p.get(path, **basic()).status_code == 404, path
    assert all("_runyard" not in path for path in backend.paths())


def test_token_auth(proxy, backend):
    p = proxy(auth="token")
    ok = p.get("/api/2.0/mlflow/runs/get?run_id=1", **with_headers(bearer(), X_Forwarded_User="mallory"))
    assert ok.status_code == 200 and ok.json()["user"] == TOKEN_USER
    call = backend.auth_calls[-1]
    assert call["method"] == "GET" and call["path"] == "/_runyard/auth" and call["size"] == 0
    assert call["authorization"] == f"Bearer {TOKEN}" and call["forwarded_user"] is None

    upload = requests.post(p.base + "/api/2.0/mlflow/runs/log-batch", data=b"x" * 100_000, timeout=10,
                           **bearer())
    assert upload.status_code == 200 and upload.json()["size"] == 100_000
    assert backend.auth_calls[-1]["method"] == "GET" and backend.auth_calls[-1]["size"] == 0
    assert backend.auth_calls[-1]["content_length"] is None  # the body stays with the real request

    calls = len(backend.auth_calls)
    for options in (bearer("wrong"), {}, basic(), authorization("Negotiate abc")):
        assert_denied(p.get("/version", **options), "token", options)
    assert len(backend.auth_calls) == calls + 1  # only the bearer token was worth asking about
    assert p.get("/health").status_code == 200
    assert p.get("/_runyard/auth", **bearer()).status_code == 404


@pytest.mark.parametrize("auth", AUTH_MODES)
def test_only_the_schemes_of_the_mode_reach_the_server(proxy, backend, auth):
    """nginx refuses any other kind of Authorization itself: it never reaches the server, neither its
    auth check nor a protected path, and every refusal carries the mode's challenges and no more."""
    p = proxy(auth=auth, login_rate="10000r/s")  # many failures on purpose: not limited here
    path = "/api/2.0/mlflow/experiments/search"
    good = {"basic": (basic_header(), USER), "bearer": (f"Bearer {TOKEN}", TOKEN_USER)}
    for scheme, (header, user) in good.items():
        word, _, credential = header.partition(" ")
        for value in (header, f"{word.upper()} {credential}", f"{word.lower()} {credential}"):
            backend.reset()
            response = p.get(path, **with_headers(authorization(value), X_Forwarded_User="mallory"))
            if scheme in SCHEMES[auth]:  # asked about, let in, named by the server
                assert response.status_code == 200, (value, response.text)
                assert response.json()["user"] == user
                assert [c["authorization"] for c in backend.auth_calls] == [value]
            else:
                assert_denied(response, auth, value)
                assert backend.authorizations() == [], value  # not even the auth check saw it

    backend.reset()
    for value in ("Negotiate YWxpY2U=", "Digest username=alice", "Basic", "Bearer", "Basicx YWxpY2U=",
                  f"Token {TOKEN}", f"X Bearer {TOKEN}", TOKEN):
        assert_denied(p.get(path, **authorization(value)), auth, value)
    assert backend.authorizations() == []

    # Two Authorization headers are no way around the scheme check.
    connection = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    connection.putrequest("GET", path)
    for value in (f"Bearer {TOKEN}", basic_header()):
        connection.putheader("Authorization", value)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 400
    assert backend.authorizations() == []


@pytest.mark.parametrize("auth", AUTH_MODES)
def test_refused_logins_forward_nothing(proxy, backend, auth):
    """Whatever the client claims, a refused login reaches no protected path, so no X-Forwarded-User
    reaches the server; the auth check itself never carries one either."""
    p = proxy(auth=auth, login_rate="10000r/s")
    assert p.get("/health", **with_headers(basic(), X_Forwarded_User="mallory")).json()["user"] is None
    backend.reset()
    refusals = [{}, basic(password="wrong"), basic(user="mallory"), basic(user=""), bearer("wrong"),
                bearer(""), basic(), bearer()]
    allowed = {"basic": basic(), "bearer": bearer()}
    refusals = [r for r in refusals if all(r != allowed[s] for s in SCHEMES[auth])]
    for options in refusals:
        for path in ("/version", "/api/2.0/mlflow/runs/get", "/api/2.0/mlflow-artifacts/artifacts/m.bin",
                     "/get-artifact"):
            response = p.get(path, **with_headers(options, X_Forwarded_User="mallory",
                                                  X_Runyard_User="mallory"))
            assert_denied(response, auth, (options, path))
    assert backend.requests == []
    assert all(call["forwarded_user"] is None for call in backend.auth_calls)
    assert all((call["authorization"] or "").partition(" ")[0].lower() in SCHEMES[auth]
               for call in backend.auth_calls)

    for scheme in sorted(SCHEMES[auth]):
        ok = p.get("/version", **with_headers(allowed[scheme], X_Forwarded_User="mallory",
                                              X_Runyard_User="mallory"))
        assert ok.status_code == 200 and ok.json()["user"] == {"basic": USER, "bearer": TOKEN_USER}[scheme]


@pytest.mark.parametrize("auth", [*AUTH_MODES, "none"])
def test_error_log_stays_quiet(proxy, auth):
    """$runyard_user, in the http-level log_format, has a value only where auth_request_set ran: logging
    /health, nginx's own refusals and checked requests must not warn about it (a variable declared by
    `set` would: 'using uninitialized "..." variable while logging request')."""
    p = proxy(auth=auth, insecure_no_auth=auth == "none", login_rate="10000r/s")
    assert p.get("/health").status_code == 200
    assert p.get("/health", **basic()).status_code == 200
    for options in ({}, basic(), bearer(), basic(password="wrong"), bearer("wrong"),
                    authorization("Negotiate abc")):
        for path in ("/version", "/api/2.0/mlflow-artifacts/artifacts/m.bin"):
            assert p.get(path, **options).status_code in (200, 401), (options, path)
    assert p.get("/health").status_code == 200
    p.process.stop()  # everything logged and flushed
    assert [line for line in complaints(p.process) if "uninitialized" in line] == []
    assert complaints(p.process) == []


def test_forwarded_user_is_the_one_the_server_names(proxy, backend):
    """The user comes from the server's X-Runyard-User, never from the Authorization header (nginx's
    $remote_user would be the basic-auth name whatever the server said)."""
    backend.names.update({USER: "alice@corp", TOKEN_USER: "svc-training"})
    p = proxy(auth="basic+token")
    assert p.get("/version", **basic()).json()["user"] == "alice@corp"
    assert p.get("/version", **bearer()).json()["user"] == "svc-training"
    artifact = p.get("/get-artifact?path=a&run_uuid=1", **with_headers(basic(), X_Runyard_User="mallory"))
    assert artifact.json()["user"] == "alice@corp"
    log = p.access_log()
    assert " - alice@corp [" in log and " - svc-training [" in log and f" - {USER} [" not in log


def test_basic_or_token_with_static_prefix(proxy, backend):
    p = proxy(auth="basic+token", static_prefix="/mlflow/")
    assert p.base.endswith("/mlflow")
    cases = [(basic(), 200, USER), (bearer(), 200, TOKEN_USER), (basic(password="wrong"), 401, None),
             (bearer("wrong"), 401, None), ({}, 401, None), (basic(user=""), 401, None)]
    for options, status, user in cases:
        response = p.get("/api/2.0/mlflow/experiments/get", **with_headers(options, X_Forwarded_User="eve"))
        if status == 200:
            assert response.status_code == 200, (options, response.text)
            assert response.json()["user"] == user
            assert response.json()["path"] == "/mlflow/api/2.0/mlflow/experiments/get"  # unchanged
        else:
            assert_denied(response, "basic+token", options)
    assert {call["path"] for call in backend.auth_calls} == {"/mlflow/_runyard/auth"}

    root = f"http://127.0.0.1:{p.port}"
    redirect = requests.get(root + "/mlflow?x=1", allow_redirects=False, timeout=10)
    assert redirect.status_code == 301 and redirect.headers["Location"] == "/mlflow/?x=1"
    before = len(backend.requests)
    for path in ("/", "/health", "/api/2.0/mlflow/experiments/get", "/mlflow2/health", "/mlflowx"):
        assert requests.get(root + path, timeout=10, **basic()).status_code == 404, path
    assert len(backend.requests) == before  # nothing outside the prefix reached the server
    assert p.get("/health").status_code == 200
    assert p.get("/_runyard/auth", **bearer()).status_code == 404
    assert p.get("/", **bearer()).json()["path"] == "/mlflow/"


def test_no_auth_still_drops_client_forwarded_user(proxy, backend):
    p = proxy(auth="none", insecure_no_auth=True)
    response = p.get("/api/2.0/mlflow/experiments/search", headers={"X-Forwarded-User": "mallory"})
    assert response.status_code == 200 and response.json()["user"] is None
    assert p.get("/_runyard/auth").status_code == 404
    assert backend.auth_calls == [] and complaints(p.process) == []


def test_failed_logins_are_rate_limited(proxy):
    p = proxy(auth="basic+token", login_rate="1r/m")
    statuses = [p.get("/version", **basic(password=f"guess{i}")).status_code for i in range(8)]
    statuses += [p.get("/version", **bearer(f"guess{i}")).status_code for i in range(8)]
    # the first failures are plain 401s (burst), then the address is limited
    assert statuses[:nginx.LOGIN_BURST] == [401] * nginx.LOGIN_BURST and statuses[-1] == 429, statuses
    # a correct password or token from the same address is never limited; neither is a request
    # without credentials (no guess), which still gets its challenges
    for _ in range(5):
        assert p.get("/version", **basic()).status_code == 200
        assert p.get("/version", **bearer()).status_code == 200
    assert_denied(p.get("/version"), "basic+token")
    limited = p.get("/version", **basic(password="again"))
    assert limited.status_code == 429
    assert_security_headers(limited)
    assert "limiting requests" in p.process.error_log()


def test_artifacts_stream_and_api_bodies_are_limited(proxy, backend):
    p = proxy(auth="basic+token")
    total = 65 * MIB  # above the API limit of 64 MiB

    def body():
        yield b"a" * MIB
        # the backend has the first MiB while the client still holds the rest: nginx streams
        assert backend.got_first_mib.wait(10), "nginx buffered the upload instead of streaming it"
        for _ in range(total // MIB - 1):
            yield b"b" * MIB

    upload = requests.put(p.base + "/api/2.0/mlflow-artifacts/artifacts/0/run/model.bin", data=body(),
                          timeout=60, **bearer())
    assert upload.status_code == 200, upload.text
    assert upload.json()["size"] == total and upload.json()["user"] == TOKEN_USER
    # the auth subrequest of that chunked upload carried no body and no body headers
    assert backend.auth_calls[-1]["size"] == 0 and backend.auth_calls[-1]["transfer_encoding"] is None
    # with a declared length (as the mlflow client sends it) the auth subrequest sees that length too,
    # and must not apply a body limit of its own
    declared = requests.put(p.base + "/api/2.0/mlflow-artifacts/artifacts/0/run/weights.bin",
                            data=b"w" * (3 * MIB), timeout=60, **bearer())
    assert declared.status_code == 200 and declared.json()["size"] == 3 * MIB
    assert backend.auth_calls[-1]["size"] == 0 and backend.auth_calls[-1]["content_length"] is None

    # a JSON API route refuses the same size up front, from the declared length alone
    connection = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
    credentials = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    connection.putrequest("POST", "/api/2.0/mlflow/runs/log-batch")
    connection.putheader("Authorization", credentials)
    connection.putheader("Content-Length", str(total))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    small = requests.post(p.base + "/api/2.0/mlflow/runs/log-batch", data=b"{}" * MIB, timeout=10,
                          **basic())
    assert small.status_code == 200 and small.json()["size"] == 2 * MIB

    download = p.get("/get-artifact?path=model.bin&run_uuid=1", **basic())
    assert download.status_code == 200 and download.json()["path"].startswith("/get-artifact")


def test_tls_and_mutual_tls(proxy, material):
    p = proxy(auth="basic", **tls_options(material, "tls"))
    with pytest.raises(requests.exceptions.SSLError):
        p.get("/health")  # not a publicly trusted CA
    health = p.get("/health", verify=material["ca"])
    assert health.status_code == 200 and health.json()["forwarded_proto"] == "https"
    assert_security_headers(health, tls=True)
    denied = p.get("/version", verify=material["ca"])
    assert denied.status_code == 401
    assert denied.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert p.get("/version", verify=material["ca"], **basic()).json()["user"] == USER

    m = proxy(auth="basic", **tls_options(material, "mtls"))
    assert_refused(lambda: m.get("/health", verify=material["ca"]))  # no client certificate
    client = (material["client_cert"], material["client_key"])
    assert m.get("/health", verify=material["ca"], cert=client).status_code == 200
    ok = m.get("/version", verify=material["ca"], cert=client, **basic())
    assert ok.status_code == 200 and ok.json()["user"] == USER
    # a server certificate from the same CA is no client certificate (no clientAuth usage)
    assert_refused(lambda: m.get("/health", verify=material["ca"], cert=(material["cert"], material["key"])))


def assert_refused(request):
    """nginx completes the handshake and answers 400 ("No required SSL certificate was sent", "The SSL
    certificate error"); a failed handshake would be a refusal too."""
    try:
        response = request()
    except requests.exceptions.SSLError:
        return
    assert response.status_code == 400, response.text
    assert "backend" not in response.text


def test_plain_http_redirects_to_https(proxy, material):
    p = proxy(auth="basic", static_prefix="/mlflow", **tls_options(material, "tls+redirect"))
    plain = p.settings.redirect_http
    response = requests.get(f"http://{plain}/mlflow/api/2.0/mlflow/runs/get?run_id=7",
                            allow_redirects=False, timeout=10)
    assert response.status_code == 301
    assert response.headers["Location"] == f"https://127.0.0.1:{p.port}/mlflow/api/2.0/mlflow/runs/get?run_id=7"
    assert p.get("/health", verify=material["ca"]).status_code == 200


def test_two_upstreams_share_the_load(proxy, backends, backend):
    p = proxy(auth="none", insecure_no_auth=True, upstreams=tuple(b.address for b in backends))
    with requests.Session() as session:  # one connection, so one nginx worker and its turn-taking
        names = {session.get(p.base + "/version", timeout=10).json()["backend"] for _ in range(8)}
    assert names == {"one", "two"}

    # With auth, each request is two upstream requests (the check, then the request itself), and a
    # check may well land on another server than its request: the user travels through nginx.
    p = proxy(auth="basic+token", upstreams=tuple(b.address for b in backends))
    for b in backends:
        b.reset()
    with requests.Session() as session:
        for i in range(8):
            options = basic() if i % 2 else bearer()
            seen = session.get(p.base + "/version", timeout=10, **options).json()
            assert seen["user"] == (USER if i % 2 else TOKEN_USER)
    assert all(b.requests or b.auth_calls for b in backends)
    assert sum(len(b.requests) for b in backends) == sum(len(b.auth_calls) for b in backends) == 8


def test_access_log_has_no_secrets(proxy):
    p = proxy(auth="basic+token")
    p.get("/api/2.0/mlflow/runs/get?secret_query=qq-hidden", **bearer())
    p.get("/api/2.0/mlflow/runs/get?secret_query=qq-hidden", **basic())
    p.get("/version", **basic(password="not-the-password"))
    p.get("/health", **basic())
    log = p.access_log()
    assert "/api/2.0/mlflow/runs/get" in log and f" - {TOKEN_USER} [" in log and f" - {USER} [" in log
    for secret in ("qq-hidden", TOKEN, PASSWORD, "not-the-password", "Basic ", "Bearer ",
                   basic_header().partition(" ")[2], basic_header(password="not-the-password")[6:]):
        assert secret not in log, secret
    lines = log.splitlines()
    # A refusal and a probe name nobody, whatever Authorization they carried.
    assert re.search(r' - - \[[^]]+\] "GET /version HTTP/1\.1" 401 ', log), lines
    assert re.search(r' - - \[[^]]+\] "GET /health HTTP/1\.1" 200 ', log), lines


def test_reload_switches_configuration(proxy, material, tmp_path):
    p = proxy(auth="basic")
    assert p.get("/version", **bearer()).status_code == 401
    assert p.get("/version", **basic()).status_code == 200
    token_settings = dataclasses.replace(p.settings, auth="token")
    write(token_settings, p.conf)
    p.process.reload()
    assert p.get("/version", **bearer()).status_code == 200
    assert_denied(p.get("/version", **basic()), "token")
    # a configuration nginx refuses (written unchecked) keeps the old one serving
    broken = dataclasses.replace(token_settings, tls_cert=str(tmp_path / "absent.pem"),
                                 tls_key=material["key"])
    write(broken, p.conf, validate=False)
    with pytest.raises(RuntimeError, match="absent.pem"):
        p.process.reload()
    assert p.get("/version", **bearer()).status_code == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start workers as another user")
def test_write_refuses_what_workers_could_not_reach(material, tmp_path):
    """The temp folders are the workers' business, which nginx -t does not check."""
    base = Path(tempfile.mkdtemp(prefix="runyard-nginx-"))
    try:
        base.chmod(0o755)
        settings = settings_for(material, tmp_path, worker_user=None, state_dir=str(base / "state"))
        write(settings, base / "nginx.conf")  # creates the state directory for nobody
        (base / "state").chmod(0o700)  # now root-owned and closed
        os.chown(base / "state", 0, 0)
        (base / "nginx.conf").unlink()
        with pytest.raises(RunyardError, match=r"^--state-dir: nginx workers run as nobody"):
            write(settings, base / "nginx.conf")
        assert not (base / "nginx.conf").exists()
        write(settings, base / "nginx.conf", validate=False)  # another host's business
        assert (base / "nginx.conf").exists()
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start workers as another user")
def test_workers_as_nobody_reach_their_temp_folders(backend):
    """Without `user`, a root nginx runs workers as nobody: the state dir `write` creates belongs to
    them, so request bodies spilled to temp files work (a root-owned 0700 state dir answers 500)."""
    base = Path(tempfile.mkdtemp(prefix="runyard-nginx-"))
    base.chmod(0o755)  # mkdtemp makes it 0700: nobody could not even reach the state dir inside
    process = NginxProcess()
    try:
        settings = NginxSettings(upstreams=(backend.address,), listen=f"127.0.0.1:{free_port()}",
                                 auth="basic", state_dir=str(base / "state"))
        conf = write(settings, base / "nginx.conf")
        assert "\nuser " not in Path(conf).read_text()
        assert (base / "state").stat().st_uid != 0
        process.start(conf)
        response = requests.post(f"http://{settings.listen}/api/2.0/mlflow/runs/log-batch",
                                 data=b"x" * (3 * MIB), timeout=10, **basic())
        assert response.status_code == 200 and response.json()["size"] == 3 * MIB
        assert response.json()["user"] == USER
    finally:
        process.stop()
        shutil.rmtree(base)


def test_runner_reports_a_failed_start(material, tmp_path):
    settings = settings_for(material, tmp_path, tls_cert=str(tmp_path / "absent.pem"),
                            tls_key=material["key"])
    conf = write(settings, tmp_path / "nginx.conf", validate=False)
    process = NginxProcess()
    with pytest.raises(RuntimeError, match="absent.pem"):
        process.start(conf)
    assert process.proc.poll() is not None


def test_runner_does_not_mistake_another_listener_for_nginx(material, tmp_path):
    """Readiness is the pid file plus the ports: a port someone else holds does not count."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        listen = f"127.0.0.1:{other.getsockname()[1]}"
        conf = write(settings_for(material, tmp_path, listen=listen), tmp_path / "nginx.conf")
        process = NginxProcess()
        with pytest.raises(RuntimeError, match="Address already in use"):
            process.start(conf)
