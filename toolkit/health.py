"""`runyard health`: the tracking server end to end, as an MLflow client sees it.

`probe(url)` runs these steps in order, timing each one:

  liveness    GET {url}/health -> 200
  readiness   GET {url}/ready  -> 200 {"status": "ready", "checks": {...}}; the server's own checks are
              nested in the report. 404 (an MLflow server, an older runyard) is "unsupported", not a failure
  api_read    GET {url}/api/2.0/mlflow/experiments/search?max_results=1 -> 200, with the credentials
  api_write   (write=True) in experiment `runyard-health-probe` (created once, then reused): create a run,
              log a metric and a param, read the run back and compare, delete the run. The run is deleted
              in a `finally`, whatever failed before; MLflow's delete is a soft delete (lifecycle_stage
              "deleted"), as for any client

Overall status: `ok` (everything passed), `degraded` (the server answers and reads work, but readiness
reports a failing check or the write probe failed), `down` (no answer, TLS or connection error, liveness
fails, or the API read fails, authentication included). `EXIT_CODES` maps them to 0 / 1 / 2.

Credentials and TLS come from MLflow's own environment variables, read at call time and attached as the
mlflow client does: MLFLOW_TRACKING_USERNAME + MLFLOW_TRACKING_PASSWORD (basic, preferred when both are
set), else MLFLOW_TRACKING_TOKEN (bearer); MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH
(CA bundle; not with the former), MLFLOW_TRACKING_CLIENT_CERT_PATH (certificate + key PEM). A URL
carrying `user:password@` is used as basic credentials (requests does the same for the mlflow client,
ahead of the variables) and never shown: the report's URL has no userinfo, and every string in the report
is scrubbed of the password, the token and the Authorization values built from them.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import socket
import ssl
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.exceptions import InsecureRequestWarning

EXIT_CODES = {"ok": 0, "degraded": 1, "down": 2}
PROBE_EXPERIMENT = "runyard-health-probe"
PROBE_TAG = "runyard.health-probe"
API = "/api/2.0/mlflow"
STEPS = ("liveness", "readiness", "api_read", "api_write")
_REASON_CHARS = 240
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#@]*@")
_TITLE = re.compile(r"<title>\s*(.*?)\s*</title>", re.IGNORECASE | re.DOTALL)


# --- client settings -----------------------------------------------------------------------------------

class _ConfigError(Exception):
    """The probe cannot start: a bad URL or contradictory MLflow environment variables."""


class BearerAuth(AuthBase):
    """`Authorization: Bearer <token>`, as the mlflow client sends MLFLOW_TRACKING_TOKEN; never in a repr."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, request):
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "<bearer token>"


@dataclass(frozen=True, repr=False)
class _Settings:
    base_url: str  # scheme://host[:port][/prefix], no userinfo, no trailing slash
    auth_kind: str  # basic | token | none
    auth_source: str  # where the credential came from, for messages (names, never values)
    auth: AuthBase | None
    verify: bool | str
    cert: str | None
    tls: str | None  # None (http), "verified", "verified (CA file)", "unverified"
    secrets: tuple[str, ...]

    def __repr__(self) -> str:  # never the credentials
        return f"_Settings({self.base_url!r}, auth={self.auth_kind})"


def strip_userinfo(url: str) -> str:
    """The URL without any `user:password@` (also when it is not a well-formed URL)."""
    return _USERINFO.sub(lambda m: m.group(1) or "", url.strip(), count=1)


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip()
    if not raw:
        return False
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise _ConfigError(f"{name} must be true, false, 1 or 0 (got {raw!r})")


def _settings(url: str, env: Mapping[str, str]) -> _Settings:
    if not url:
        raise _ConfigError("no tracking URI: pass URL or set MLFLOW_TRACKING_URI")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise _ConfigError(f"the tracking URI is not a valid URL ({_short(str(exc))})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise _ConfigError("the tracking URI must be an http:// or https:// URL of a tracking server")
    host = parts.netloc.rpartition("@")[2]
    if not host or host.startswith(":"):
        raise _ConfigError("the tracking URI has no host")
    base_url = urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), "", ""))

    username, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    token = env.get("MLFLOW_TRACKING_TOKEN")
    url_user = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password else None
    secrets: list[str] = []
    if url_user and url_password:
        kind, source, auth = "basic", "user and password in the URL", HTTPBasicAuth(url_user, url_password)
        username, password = url_user, url_password
    elif username and password:
        kind, source = "basic", "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
        auth = HTTPBasicAuth(username, password)
    elif token:
        kind, source, auth = "token", "MLFLOW_TRACKING_TOKEN", BearerAuth(token)
    else:
        kind, source, auth = "none", "", None
    for value in (parts.password, url_password, password, token):
        if value:
            secrets.append(value)
    if username and password:
        secrets.append(base64.b64encode(f"{username}:{password}".encode()).decode())
    if username and password and kind == "basic":
        source += f", user {username!r}"

    insecure = _flag(env, "MLFLOW_TRACKING_INSECURE_TLS")
    ca_file = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    if insecure and ca_file:
        raise _ConfigError("MLFLOW_TRACKING_INSECURE_TLS and MLFLOW_TRACKING_SERVER_CERT_PATH are both set; "
                           "set only one (as the mlflow client requires)")
    verify: bool | str = ca_file if ca_file else not insecure
    tls = None
    if parts.scheme.lower() == "https":
        tls = "unverified" if insecure else "verified (CA file)" if ca_file else "verified"
    cert = env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    return _Settings(base_url, kind, source, auth, verify, cert, tls,
                     tuple(sorted(set(secrets), key=len, reverse=True)))


def _credentials_phrase(settings: _Settings) -> str:
    if settings.auth_kind == "none":
        return ("no credentials were sent (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                "or MLFLOW_TRACKING_TOKEN)")
    return f"credentials: {settings.auth_kind} ({settings.auth_source})"


# --- HTTP ----------------------------------------------------------------------------------------------

class _Unreachable(Exception):
    """No HTTP answer: connection, TLS or timeout. `reason` is short and free of secrets."""

    def __init__(self, reason: str, ms: float):
        super().__init__(reason)
        self.reason, self.ms = reason, ms


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it wraps (urllib3 hides the real cause in args and `.reason`)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        nested = [getattr(item, "reason", None), item.__cause__, item.__context__,
                  *(a for a in getattr(item, "args", ()) if isinstance(a, BaseException))]
        todo.extend(n for n in nested if isinstance(n, BaseException))


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _describe(exc: BaseException, timeout: float) -> str:
    chain = list(_causes(exc))
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            return _short(f"TLS: certificate verify failed: {item.verify_message or item.reason}")
    for item in chain:
        if isinstance(item, ssl.SSLError):
            return _short(f"TLS error: {item.reason or item}")
    if any(isinstance(item, requests.exceptions.SSLError) for item in chain):
        return _short(f"TLS error: {exc}")
    if any(isinstance(item, requests.Timeout | TimeoutError) for item in chain):
        return f"no answer within {timeout:g} s"
    if any(isinstance(item, ConnectionRefusedError) for item in chain):
        return "connection refused"
    if any(isinstance(item, socket.gaierror) for item in chain):
        return "host name not resolved"
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema):
        return _short(f"invalid URL: {exc}")
    if isinstance(exc, OSError) and not isinstance(exc, requests.RequestException):
        return _short(f"TLS setup: {exc}")  # requests: a certificate or CA file that cannot be read
    innermost = chain[-1]
    return _short(f"connection failed: {type(innermost).__name__}: {innermost}")


class _Client:
    def __init__(self, session: requests.Session, settings: _Settings, timeout: float):
        self.session, self.settings, self.timeout = session, settings, timeout

    def call(self, method: str, path: str, params: dict | None = None, body: dict | None = None
             ) -> tuple[requests.Response, float]:
        start = time.perf_counter()
        try:
            response = self.session.request(method, self.settings.base_url + path, params=params, json=body,
                                            timeout=self.timeout, verify=self.settings.verify,
                                            cert=self.settings.cert)
        except (requests.RequestException, OSError, ValueError) as exc:
            raise _Unreachable(_describe(exc, self.timeout), _ms(start)) from None
        return response, _ms(start)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error_text(response: requests.Response) -> str:
    body = _json(response)
    if isinstance(body, dict) and ("error_code" in body or "message" in body):
        return _short(": ".join(str(body[k]) for k in ("error_code", "message") if body.get(k)))
    text = response.text or ""
    title = _TITLE.search(text)
    if title:  # an HTML error page (NGINX): "400 No required SSL certificate was sent"
        return _short(title.group(1).removeprefix(str(response.status_code)).strip())
    return _short(text.strip().splitlines()[0]) if text.strip() else ""


def _http_reason(response: requests.Response, settings: _Settings, path_hint: bool = False) -> str:
    status = response.status_code
    if status in (401, 403):
        return f"authentication failed ({status}); {_credentials_phrase(settings)}"
    if status == 429:
        return "too many requests (429): rate limited, e.g. by the proxy after failed logins"
    detail = _error_text(response)
    reason = f"HTTP {status}" + (f": {detail}" if detail else "")
    if status == 404 and path_hint:
        reason += " (check the URL and its path prefix)"
    return _short(reason)


# --- steps ---------------------------------------------------------------------------------------------

def _step(name: str, ok: bool, ms: float, reason: str | None = None, details: dict | None = None,
          **extra: Any) -> dict:
    step: dict[str, Any] = {"name": name, "ok": ok, "ms": ms}
    if reason:
        step["reason"] = reason
    if details:
        step["details"] = details
    step.update(extra)
    return step


def _skipped(name: str, because: str) -> dict:
    return _step(name, False, 0.0, f"not run: {because}", skipped=True)


def _liveness(client: _Client) -> dict:
    try:
        response, ms = client.call("GET", "/health")
    except _Unreachable as exc:
        return _step("liveness", False, exc.ms, exc.reason)
    if response.status_code != 200:
        return _step("liveness", False, ms, _http_reason(response, client.settings, path_hint=True))
    return _step("liveness", True, ms)


def _check_reason(check: Any) -> str:
    return str(check.get("reason") or "failed") if isinstance(check, dict) else "failed"


def _readiness(client: _Client) -> dict:
    try:
        response, ms = client.call("GET", "/ready")
    except _Unreachable as exc:
        return _step("readiness", False, exc.ms, exc.reason)
    status = response.status_code
    if status == 404:  # an MLflow server, or a runyard without /ready: nothing to hold against it
        return _step("readiness", True, ms, details={"http_status": 404}, unsupported=True)
    body = _json(response)
    if status in (200, 503) and isinstance(body, dict) and "status" in body:
        checks = body.get("checks") if isinstance(body.get("checks"), dict) else {}
        details = {"status": body["status"], "checks": checks}
        failing = [name for name, check in checks.items()
                   if not (isinstance(check, dict) and check.get("ok"))]
        if status == 200 and body["status"] == "ready" and not failing:
            return _step("readiness", True, ms, details=details)
        if failing:
            reason = "not ready: " + "; ".join(
                f"{name}: {_check_reason(checks[name])}" for name in failing)
        else:
            reason = f"not ready (HTTP {status}, status {body['status']!r})"
        return _step("readiness", False, ms, _short(reason), details)
    if status == 200:
        return _step("readiness", True, ms)
    return _step("readiness", False, ms, _http_reason(response, client.settings))


def _api_read(client: _Client) -> dict:
    try:
        response, ms = client.call("GET", f"{API}/experiments/search", params={"max_results": 1})
    except _Unreachable as exc:
        return _step("api_read", False, exc.ms, exc.reason)
    if response.status_code != 200:
        return _step("api_read", False, ms, _http_reason(response, client.settings, path_hint=True))
    if not isinstance(_json(response), dict):
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        return _step("api_read", False, ms, f"not an MLflow API answer (HTTP 200, {kind})")
    return _step("api_read", True, ms)


class _PhaseFailed(Exception):
    pass


class _WriteProbe:
    """One run in the probe experiment, through its whole life; `phases` records each call."""

    def __init__(self, client: _Client):
        self.client = client
        self.phases: list[dict] = []
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.run_name = f"health-probe-{uuid.uuid4().hex[:12]}"

    def _call(self, phase: str, method: str, path: str, params: dict | None = None, body: dict | None = None,
              accept: tuple[str, ...] = ()) -> dict:
        """The JSON answer; an MLflow error whose code is in `accept` is returned, any other raises."""
        try:
            response, ms = self.client.call(method, f"{API}/{path}", params=params, body=body)
        except _Unreachable as exc:
            self.phases.append({"name": phase, "ok": False, "ms": exc.ms})
            raise _PhaseFailed(f"{phase}: {exc.reason}") from None
        answer = _json(response)
        if response.status_code == 200 and isinstance(answer, dict):
            self.phases.append({"name": phase, "ok": True, "ms": ms})
            return answer
        if isinstance(answer, dict) and answer.get("error_code") in accept:
            self.phases.append({"name": phase, "ok": True, "ms": ms})
            return answer
        self.phases.append({"name": phase, "ok": False, "ms": ms})
        raise _PhaseFailed(f"{phase}: {_http_reason(response, self.client.settings)}")

    def _experiment(self) -> str:
        for _attempt in range(2):
            found = self._call("get-experiment", "GET", "experiments/get-by-name",
                               params={"experiment_name": PROBE_EXPERIMENT},
                               accept=("RESOURCE_DOES_NOT_EXIST",))
            experiment = found.get("experiment")
            if experiment:
                if experiment.get("lifecycle_stage") == "deleted":  # deleted by hand: its name is taken
                    self._call("restore-experiment", "POST", "experiments/restore",
                               body={"experiment_id": experiment["experiment_id"]})
                return str(experiment["experiment_id"])
            created = self._call("create-experiment", "POST", "experiments/create",
                                 body={"name": PROBE_EXPERIMENT}, accept=("RESOURCE_ALREADY_EXISTS",))
            if created.get("experiment_id"):
                return str(created["experiment_id"])
            # another probe created it at the same moment: look it up again
        raise _PhaseFailed(f"get-experiment: {PROBE_EXPERIMENT!r} neither found nor created")

    def _exercise(self) -> None:
        self.experiment_id = self._experiment()
        now = int(time.time() * 1000)
        created = self._call("create-run", "POST", "runs/create", body={
            "experiment_id": self.experiment_id, "run_name": self.run_name, "start_time": now,
            "tags": [{"key": PROBE_TAG, "value": "true"}]})
        try:
            self.run_id = str(created["run"]["info"]["run_id"])
        except (KeyError, TypeError):
            raise _PhaseFailed("create-run: the answer has no run id") from None
        metric, param = random.uniform(0.0, 1.0), uuid.uuid4().hex
        self._call("log-metric", "POST", "runs/log-metric", body={
            "run_id": self.run_id, "key": "probe_metric", "value": metric, "timestamp": now, "step": 0})
        self._call("log-param", "POST", "runs/log-parameter", body={
            "run_id": self.run_id, "key": "probe_param", "value": param})
        run = self._call("get-run", "GET", "runs/get", params={"run_id": self.run_id}).get("run") or {}
        data = run.get("data") or {}
        metrics = {m.get("key"): m.get("value") for m in data.get("metrics") or []}
        params = {p.get("key"): p.get("value") for p in data.get("params") or []}
        if metrics.get("probe_metric") != metric:
            raise _PhaseFailed(f"read-back: metric probe_metric is {metrics.get('probe_metric')!r}, "
                               f"logged {metric!r}")
        if params.get("probe_param") != param:
            raise _PhaseFailed(f"read-back: param probe_param is {params.get('probe_param')!r}, "
                               f"logged {param!r}")

    def _find_lost_run(self) -> None:
        """create-run failed without an answer: the run may exist all the same; find it by its name."""
        try:
            found = self._call("find-run", "POST", "runs/search", body={
                "experiment_ids": [self.experiment_id], "max_results": 5,
                "filter": f"attributes.run_name = '{self.run_name}'"})
        except _PhaseFailed:
            return
        runs = found.get("runs") or []
        if runs:
            self.run_id = str(runs[0]["info"]["run_id"])

    def run(self) -> dict:
        start = time.perf_counter()
        failure = cleanup = None
        try:
            self._exercise()
        except _PhaseFailed as exc:
            failure = str(exc)
        finally:  # also on KeyboardInterrupt: never leave the probe run behind
            if self.run_id is None and self.experiment_id is not None and \
                    any(p["name"] == "create-run" and not p["ok"] for p in self.phases):
                self._find_lost_run()
            if self.run_id is not None:
                try:
                    self._call("delete-run", "POST", "runs/delete", body={"run_id": self.run_id})
                except _PhaseFailed as exc:
                    cleanup = str(exc)
        details = {"experiment": PROBE_EXPERIMENT, "experiment_id": self.experiment_id, "run_id": self.run_id,
                   "run_deleted": self.run_id is not None and cleanup is None, "phases": self.phases}
        if failure and cleanup:
            reason = f"{failure}; and the probe run was left behind ({cleanup})"
        else:
            reason = failure or (f"{cleanup} (the probe run was left behind)" if cleanup else None)
        return _step("api_write", reason is None, _ms(start), _short(reason) if reason else None, details)


# --- the probe -----------------------------------------------------------------------------------------

def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, secrets) for v in value]
    return value


def _overall(steps: list[dict]) -> str:
    by_name = {step["name"]: step for step in steps}
    vital = ("configuration", "liveness", "api_read")
    if "api_read" not in by_name or any(not by_name[name]["ok"] for name in vital if name in by_name):
        return "down"
    return "ok" if all(step["ok"] for step in steps) else "degraded"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def probe(url: str, write: bool = False, timeout: float = 10.0, env: Mapping[str, str] | None = None) -> dict:
    """One end-to-end check of the tracking server at `url` (default: MLFLOW_TRACKING_URI); see the module
    docstring. Never raises for what it finds: the report says it."""
    if timeout <= 0:
        raise ValueError("the timeout must be a positive number of seconds")
    env = os.environ if env is None else env
    url = url or env.get("MLFLOW_TRACKING_URI") or ""
    checked_at = _now()
    try:
        settings = _settings(url, env)
    except _ConfigError as exc:
        userinfo = _USERINFO.match(url.strip())
        url_password = userinfo.group(0).removeprefix(userinfo.group(1) or "")[:-1].partition(":")[2] \
            if userinfo else ""
        secrets = tuple(s for s in (env.get("MLFLOW_TRACKING_PASSWORD"), env.get("MLFLOW_TRACKING_TOKEN"),
                                    url_password, unquote(url_password)) if s)
        steps = [_step("configuration", False, 0.0, str(exc))]
        return _redact({"url": strip_userinfo(url), "status": "down", "checked_at": checked_at,
                        "auth": None, "tls": None, "steps": steps}, secrets)

    steps: list[dict] = []
    with requests.Session() as session, warnings.catch_warnings():
        if settings.tls == "unverified":  # asked for explicitly; the report says "TLS unverified"
            warnings.simplefilter("ignore", InsecureRequestWarning)
        session.auth = settings.auth
        session.headers["User-Agent"] = "runyard-health"
        client = _Client(session, settings, timeout)
        steps.append(_liveness(client))
        if not steps[0]["ok"]:
            steps += [_skipped(name, "liveness failed") for name in ("readiness", "api_read")]
            if write:
                steps.append(_skipped("api_write", "liveness failed"))
        else:
            steps.append(_readiness(client))
            steps.append(_api_read(client))
            if write:
                steps.append(_WriteProbe(client).run() if steps[-1]["ok"]
                             else _skipped("api_write", "the API read failed"))
    report = {"url": settings.base_url, "status": _overall(steps), "checked_at": checked_at,
              "auth": settings.auth_kind, "tls": settings.tls, "steps": steps}
    return _redact(report, settings.secrets)


def exit_code(report: dict) -> int:
    return EXIT_CODES[report["status"]]


def to_json(report: dict) -> str:
    """The report as one line of JSON (what `--json` prints)."""
    return json.dumps(report, separators=(",", ":"), ensure_ascii=False)


# --- output and watching -------------------------------------------------------------------------------

def _mark(step: dict) -> str:
    if step.get("skipped") or step.get("unsupported"):
        return "–"
    return "✓" if step["ok"] else "✗"


def format_report(report: dict) -> str:
    """A few aligned lines for people: the verdict, then one line per step (and per server check)."""
    extras = [f"auth {report['auth']}"] if report.get("auth") else []
    if report.get("tls"):
        extras.append(f"TLS {report['tls']}")
    head = f"{report['status'].upper():<8} {report['url']}"
    lines = [head + (f"  ({', '.join(extras)})" if extras else "") + f"  at {report['checked_at']}"]
    width = max(len(step["name"]) for step in report["steps"])
    for step in report["steps"]:
        timing = "" if step.get("skipped") else f"{step['ms']:.1f} ms"
        text = step.get("reason") or ""
        if step.get("unsupported"):
            text = "unsupported (the server has no /ready)"
        lines.append(f"  {_mark(step)} {step['name']:<{width}} {timing:>10}  {text}".rstrip())
        checks = (step.get("details") or {}).get("checks") if step["name"] == "readiness" else None
        if isinstance(checks, dict) and checks:
            check_width = max(len(str(name)) for name in checks)
            for name, check in checks.items():
                check = check if isinstance(check, dict) else {}
                ms = check.get("ms")
                timing = f"{ms:.1f} ms" if isinstance(ms, int | float) else ""
                lines.append(f"      {'✓' if check.get('ok') else '✗'} {name:<{check_width}} {timing:>10}  "
                             f"{check.get('reason') or ''}".rstrip())
    return "\n".join(lines)


def _print_report(report: dict) -> None:
    print(format_report(report), flush=True)


def watch(url: str, interval: float, write: bool = False, emit: Callable[[dict], None] = _print_report,
          stop: threading.Event | None = None, timeout: float = 10.0, env: Mapping[str, str] | None = None
          ) -> int:
    """Probes every `interval` seconds (from the start of one probe to the next), handing each report to
    `emit` (default: printed for people), until `stop` is set or Ctrl-C; returns the exit code of the last
    report (Ctrl-C during the very first probe propagates: there is no report to judge)."""
    if interval <= 0:
        raise ValueError("the watch interval must be a positive number of seconds")
    stop = stop or threading.Event()
    code: int | None = None
    try:
        while True:
            started = time.monotonic()
            report = probe(url, write=write, timeout=timeout, env=env)
            code = exit_code(report)
            emit(report)
            if stop.wait(max(0.0, interval - (time.monotonic() - started))):
                break
    except KeyboardInterrupt:
        if code is None:
            raise
    return code
