"""`python -m bench.auth`: authenticated tracking traffic, runyard behind NGINX next to MLflow's own
basic-auth app (`mlflow server --app-name basic-auth`), written into bench/RESULTS.md (section "auth").

Each client is what the stock `mlflow` client does: one keep-alive `requests.Session`, requests one after
another, the credential sent with every request (`Authorization: Bearer …` for MLFLOW_TRACKING_TOKEN,
basic auth for MLFLOW_TRACKING_USERNAME/PASSWORD). Measured per configuration, SQLite backends, one
server worker each:

  * runyard direct, no auth: the baseline showing what NGINX and authentication cost;
  * runyard behind NGINX without auth (the proxy hop alone), with bearer tokens and with basic auth: in
    both, NGINX's auth_request asks the server, which looks up the token's hash (one indexed read) or
    checks the password against its --htpasswd file (bcrypt cost 12, once per credential, remembered);
  * MLflow basic-auth direct and behind the same NGINX (`auth none`: MLflow checks the credential itself),
    stock configuration, and behind NGINX with its opt-in credential cache (auth_cache_ttl_seconds).

Workloads: runs/log-metric sequential (req/s, p50/p99) and with 4 client threads (req/s), runs/get
sequential, and the first request made with a credential the server has never seen (a new token, a new
htpasswd user, a new MLflow user; a new session, as a new client process would open). Every response in
every loop must be a 200, and before timing each protected configuration must answer 401 to a request
without credentials and to one with a wrong credential.

Examples:
    make bench                                          # runs this after the REST benchmark
    .venv/bin/python -m bench.auth --quick              # smoke run, into bench/.work/RESULTS-quick.md
    .venv/bin/python -m bench.auth --max-seconds 4 --no-mlflow-cache
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from time import perf_counter

import requests

from bench import mlflow_env, sections
from bench.rest import API, JSON_HEADERS, TIMEOUT, ApiError, Rest, create_run_body, encode, now_ms
from bench.servers import Server, ServerSpec, free_port, start, stop
from bench.workloads import percentile
from server.errors import RunyardError

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work" / "auth"
sys.path.insert(0, str(REPO / "tests"))  # the nginx runner the tests use (helpers.nginx)

from helpers.nginx import NginxProcess  # noqa: E402

from toolkit import nginx as nginx_config  # noqa: E402

BENCH_USER = "bench"
MLFLOW_ADMIN = "bench-admin"
MLFLOW_CACHE_TTL_S = 300
WARMUP_REQUESTS = 30
WARMUP_SECONDS = 2.0  # MLflow's stock basic-auth answers a few requests a second: warm-up is capped too


@dataclass(frozen=True)
class Credential:
    scheme: str  # "basic" or "bearer"
    user: str = ""
    secret: str = ""

    def apply(self, session: requests.Session) -> None:
        if self.scheme == "basic":
            session.auth = (self.user, self.secret)  # what the stock client does with a username/password
        else:
            session.headers["Authorization"] = f"Bearer {self.secret}"

    def wrong(self) -> Credential:
        if self.scheme == "basic":
            return Credential("basic", self.user, self.secret + "-wrong")
        return Credential("bearer", secret=self.secret[:-4] + "AAAA")


@dataclass
class Target:
    label: str  # the row of the table
    kind: str  # runyard | mlflow
    base: str
    credential: Credential | None  # None: an open door by design (the baselines)
    fresh: list[Credential] = field(default_factory=list)  # never used before the first-request test
    how: str = ""  # who checks the credential, for the notes


def client(base: str, credential: Credential | None) -> Rest:
    rest = Rest(base)
    if credential is not None:
        credential.apply(rest.session)
    return rest


# ---- the gate: no credentials, wrong credentials, right credentials ------------------------------------

def check_gate(t: Target) -> str:
    """Before anything is timed: a protected target refuses strangers (401), an open one says so."""
    url = f"{t.base}{API}/experiments/get-by-name"
    params = {"experiment_name": "Default"}
    anonymous = requests.get(url, params=params, timeout=TIMEOUT)
    if t.credential is None:
        if anonymous.status_code != 200:
            raise AssertionError(f"{t.label}: open baseline answered {anonymous.status_code} without "
                                 "credentials")
        return "open (no auth, by design)"
    if anonymous.status_code != 401:
        raise AssertionError(f"{t.label}: a request without credentials got {anonymous.status_code}, "
                             "not 401: the benchmark would measure an open door")
    with requests.Session() as session:
        t.credential.wrong().apply(session)
        wrong = session.get(url, params=params, timeout=TIMEOUT)
    if wrong.status_code != 401:
        raise AssertionError(f"{t.label}: a wrong credential got {wrong.status_code}, not 401")
    with requests.Session() as session:
        t.credential.apply(session)
        right = session.get(url, params=params, timeout=TIMEOUT)
    if right.status_code != 200:
        raise AssertionError(f"{t.label}: the right credential got {right.status_code}: {right.text[:200]}")
    return "401 without credentials and with a wrong one, 200 with the right one"


# ---- timed loops --------------------------------------------------------------------------------------

def metric_bodies(run_id: str, key: str, count: int) -> list[bytes]:
    # field order as the stock client sends it (api-notes §2.3); encoded before the clock starts
    ts = now_ms()
    return [encode({"run_uuid": run_id, "key": key, "value": i * 0.001, "timestamp": ts + i, "step": i,
                    "run_id": run_id}) for i in range(count)]


def warm_up(send: Callable[[int], object]) -> None:
    deadline = perf_counter() + WARMUP_SECONDS
    for i in range(WARMUP_REQUESTS):
        send(i)
        if perf_counter() >= deadline:
            break


def sequential(send: Callable[[int], object], count: int, max_seconds: float) -> dict:
    """`send(i)` for i = 0.., one after another until `count` or `max_seconds`; rate and latencies."""
    latencies = []
    started = perf_counter()
    deadline = started + max_seconds
    for i in range(count):
        t0 = perf_counter()
        send(i)
        t1 = perf_counter()
        latencies.append(t1 - t0)
        if t1 >= deadline:
            break
    elapsed = perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return {"rate": len(ms) / elapsed, "p50": percentile(ms, 50), "p99": percentile(ms, 99), "n": len(ms)}


def concurrent_log_metric(t: Target, run_id: str, threads: int, count: int, max_seconds: float) -> dict:
    """`threads` clients, each with its own session, logging metrics as fast as the server answers."""
    box: dict[str, float] = {}
    barrier = threading.Barrier(threads, action=lambda: box.update(start=perf_counter()))
    done = [0] * threads
    finished = [0.0] * threads
    errors: list[BaseException] = []
    stop_all = threading.Event()

    def worker(index: int) -> None:
        rest = client(t.base, t.credential)
        try:
            warmup = metric_bodies(run_id, f"warmup-thread-{index}", WARMUP_REQUESTS)
            bodies = metric_bodies(run_id, f"loss-thread-{index}", count)
            warm_up(lambda i: rest.post_raw("/runs/log-metric", warmup[i]))
            barrier.wait()
            deadline = box["start"] + max_seconds
            for body in bodies:
                if stop_all.is_set():
                    break
                rest.post_raw("/runs/log-metric", body)
                done[index] += 1
                if perf_counter() >= deadline:
                    break
            finished[index] = perf_counter()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            errors.append(exc)
            stop_all.set()
            barrier.abort()
        finally:
            rest.close()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = max(finished) - box["start"]
    return {"rate": sum(done) / elapsed, "n": sum(done)}


def first_request(t: Target, run_id: str) -> dict | None:
    """runs/get with each never-seen credential, from a new session (a new client process)."""
    if not t.fresh:
        return None
    latencies = []
    for credential in t.fresh:
        with requests.Session() as session:
            credential.apply(session)
            t0 = perf_counter()
            response = session.get(f"{t.base}{API}/runs/get", params={"run_id": run_id}, timeout=TIMEOUT)
            latencies.append((perf_counter() - t0) * 1000)
        if response.status_code != 200:
            raise ApiError(f"{t.label}: first request of {credential.user or 'a new token'} -> "
                           f"{response.status_code}: {response.text[:200]}")
    return {"median": median(latencies), "max": max(latencies), "n": len(latencies)}


def measure(t: Target, args) -> dict:
    print(f"[{t.label}] {t.base}", flush=True)
    result: dict = {"gate": check_gate(t), "how": t.how}
    rest = client(t.base, t.credential)
    try:
        run_id = rest.post("/runs/create", create_run_body("0", f"auth-{t.kind}"))["run"]["info"]["run_id"]
        count = max(2000, int(args.max_seconds * 4000))  # more than any server here answers in the time
        warmup = metric_bodies(run_id, "warmup", WARMUP_REQUESTS)
        bodies = metric_bodies(run_id, "loss", count)
        warm_up(lambda i: rest.post_raw("/runs/log-metric", warmup[i]))
        result["log_metric"] = sequential(lambda i: rest.post_raw("/runs/log-metric", bodies[i]),
                                          count, args.max_seconds)
        result["log_metric_threads"] = concurrent_log_metric(t, run_id, args.threads,
                                                             max(500, count // args.threads),
                                                             args.max_seconds)
        params = {"run_id": run_id}
        warm_up(lambda i: rest.get("/runs/get", params))
        result["get"] = sequential(lambda i: rest.get("/runs/get", params), count, args.max_seconds)
        result["first"] = first_request(t, run_id)
    finally:
        rest.close()
    print(f"    {summary(result)}", flush=True)
    return result


def summary(r: dict) -> str:
    first = r.get("first")
    return (f"log-metric {r['log_metric']['rate']:.1f} req/s p50 {r['log_metric']['p50']:.2f} ms "
            f"p99 {r['log_metric']['p99']:.2f} ms; {r['log_metric_threads']['rate']:.1f} req/s threaded; "
            f"get {r['get']['rate']:.1f} req/s; first request "
            + (f"{first['median']:.1f} ms" if first else "n/a"))


# ---- servers --------------------------------------------------------------------------------------------

def runyard_cli(*cli_args: str, stdin: str | None = None) -> str:
    exe = Path(sys.executable).parent / "runyard"
    done = subprocess.run([str(exe), *cli_args], input=stdin, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"runyard {cli_args[0]} {cli_args[1]} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def add_user(htpasswd: Path, name: str) -> Credential:
    password = secrets.token_urlsafe(18)
    runyard_cli("users", "add", name, "--htpasswd", str(htpasswd), "--password-stdin", stdin=password + "\n")
    return Credential("basic", name, password)


def create_token(uri: str, pepper: Path, name: str) -> Credential:
    token = runyard_cli("tokens", "create", "--name", name, "--backend-store-uri", uri,
                        "--pepper-file", str(pepper)).strip()
    if not token.startswith("ryt_"):
        raise RuntimeError(f"runyard tokens create printed no token: {token[:40]!r}")
    return Credential("bearer", name, token)


@dataclass
class RunyardSide:
    server: Server
    user: Credential
    new_users: list[Credential]
    token: Credential
    new_tokens: list[Credential]


def start_runyard(folder: Path, fresh: int) -> RunyardSide:
    folder.mkdir(parents=True)
    pepper = folder / "token-pepper"
    pepper.write_text(secrets.token_hex(32) + "\n")
    pepper.chmod(0o600)
    htpasswd = folder / "htpasswd"
    # Every user exists before the server reads the file: the new ones are new to the server, not to it.
    user = add_user(htpasswd, BENCH_USER)
    new_users = [add_user(htpasswd, f"new-user-{i}") for i in range(fresh)]
    uri = f"sqlite:///{folder / 'store.db'}"
    port = free_port()
    command = [str(Path(sys.executable).parent / "runyard"), "server", "--backend-store-uri", uri,
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--htpasswd", str(htpasswd),
               "--token-pepper-file", str(pepper), "--trusted-proxies", "127.0.0.1"]
    server = start(ServerSpec("runyard", 1), command, port, folder / "server.log", folder)
    try:
        token = create_token(uri, pepper, BENCH_USER)
        new_tokens = [create_token(uri, pepper, f"new-token-{i}") for i in range(fresh)]
    except BaseException:
        stop(server)
        raise
    return RunyardSide(server, user, new_users, token, new_tokens)


def start_mlflow(exe: Path, folder: Path, admin_password: str, cache_ttl: int) -> Server:
    folder.mkdir(parents=True)
    ini = folder / "basic_auth.ini"
    lines = ["[mlflow]", "default_permission = READ",
             f"database_uri = sqlite:///{folder / 'basic_auth.db'}",
             f"admin_username = {MLFLOW_ADMIN}", f"admin_password = {admin_password}",
             "authorization_function = mlflow.server.auth:authenticate_request_basic_auth"]
    if cache_ttl:
        lines.append(f"auth_cache_ttl_seconds = {cache_ttl}")
    ini.write_text("\n".join(lines) + "\n")
    ini.chmod(0o600)
    port = free_port()
    command = [str(exe), "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    return start(ServerSpec("mlflow", 1), command, port, folder / "server.log", folder, extra_env=env)


def mlflow_users(base: str, admin: Credential, prefix: str, count: int) -> list[Credential]:
    """New (non-admin) users through MLflow's REST API; the default permission READ lets them read runs."""
    users = []
    with requests.Session() as session:
        admin.apply(session)
        for i in range(count):
            user = Credential("basic", f"{prefix}-{i}", secrets.token_urlsafe(18))
            response = session.post(f"{base}{API}/users/create", headers=JSON_HEADERS, timeout=TIMEOUT,
                                    data=encode({"username": user.user, "password": user.secret}))
            if response.status_code != 200:
                raise ApiError(f"mlflow users/create -> {response.status_code}: {response.text[:200]}")
            users.append(user)
    return users


class Nginx:
    """NGINX in front of one server, rendered by toolkit.nginx and run by the tests' runner."""

    def __init__(self, name: str, upstream: Server, auth: str):
        folder = WORK / f"nginx-{name}"
        folder.mkdir(parents=True)
        port = free_port()
        settings = nginx_config.NginxSettings(
            upstreams=(f"127.0.0.1:{upstream.port}",), listen=f"127.0.0.1:{port}", auth=auth,
            insecure_no_auth=auth == "none", state_dir=str(folder / "state"),
            worker_user="root" if os.geteuid() == 0 else None)
        self.conf = folder / "nginx.conf"
        nginx_config.write(settings, self.conf)
        self.base = f"http://127.0.0.1:{port}"
        self.proc = NginxProcess().start(self.conf)

    def stop(self) -> None:
        self.proc.stop()


# ---- the run ------------------------------------------------------------------------------------------

def run_runyard(args, results: dict) -> None:
    side = start_runyard(WORK / "runyard", args.new_credentials)
    try:
        results["runyard · direct · no auth"] = measure(
            Target("runyard · direct · no auth", "runyard", side.server.base_url, None), args)
        for auth in ("none", "token", "basic"):
            proxy = Nginx(f"runyard-{auth}", side.server, auth)
            try:
                if auth == "none":
                    target = Target("runyard · NGINX · no auth", "runyard", proxy.base, None)
                elif auth == "token":
                    target = Target("runyard · NGINX · token", "runyard", proxy.base, side.token,
                                    side.new_tokens, "NGINX auth_request → server: HMAC of the token, "
                                    "one indexed read")
                else:
                    target = Target("runyard · NGINX · basic", "runyard", proxy.base, side.user,
                                    side.new_users, "NGINX auth_request → server: bcrypt (cost 12) "
                                    "once per credential, remembered")
                results[target.label] = measure(target, args)
            finally:
                proxy.stop()
    finally:
        stop(side.server)


def run_mlflow(args, results: dict, cache_ttl: int, direct: bool) -> None:
    exe = mlflow_env.ensure(BENCH_DIR / ".work" / "mlflow-venv")
    password = secrets.token_urlsafe(18)
    admin = Credential("basic", MLFLOW_ADMIN, password)
    suffix = f" + cache {cache_ttl} s" if cache_ttl else ""
    how = ("MLflow itself: werkzeug password hash (scrypt)"
           + (f", successes cached {cache_ttl} s" if cache_ttl else ", on every check, no cache (stock)"))
    server = start_mlflow(exe, WORK / ("mlflow-cache" if cache_ttl else "mlflow"), password, cache_ttl)
    try:
        if direct:
            label = f"MLflow basic-auth{suffix} · direct"
            fresh = mlflow_users(server.base_url, admin, "new-direct", args.new_credentials)
            results[label] = measure(Target(label, "mlflow", server.base_url, admin, fresh, how), args)
        proxy = Nginx("mlflow-cache" if cache_ttl else "mlflow", server, "none")
        try:
            label = f"MLflow basic-auth{suffix} · NGINX"
            fresh = mlflow_users(server.base_url, admin, "new-nginx", args.new_credentials)
            results[label] = measure(Target(label, "mlflow", proxy.base, admin, fresh, how), args)
        finally:
            proxy.stop()
    finally:
        stop(server)


# ---- report -------------------------------------------------------------------------------------------

COLUMNS = ["log-metric req/s", "log-metric p50 ms", "log-metric p99 ms", "log-metric 4 threads req/s",
           "runs/get req/s", "runs/get p50 ms", "first request, new credential (ms)"]
HIGHER_IS_BETTER = [True, False, False, True, True, False, False]


def values(r: dict) -> list[float | None]:
    first = r.get("first")
    return [r["log_metric"]["rate"], r["log_metric"]["p50"], r["log_metric"]["p99"],
            r["log_metric_threads"]["rate"], r["get"]["rate"], r["get"]["p50"],
            first["median"] if first else None]


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def ratio(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    if ours is None or theirs is None or ours <= 0 or theirs <= 0:
        return "—"
    x = ours / theirs if higher_is_better else theirs / ours
    return f"**{x:,.1f}×**" if x >= 10 else f"**{x:.2f}×**"


PAIRS = [  # (runyard row, MLflow row): both authenticated, both behind NGINX
    ("runyard · NGINX · token", "MLflow basic-auth · NGINX"),
    ("runyard · NGINX · basic", "MLflow basic-auth · NGINX"),
    ("runyard · NGINX · token", f"MLflow basic-auth + cache {MLFLOW_CACHE_TTL_S} s · NGINX"),
    ("runyard · NGINX · basic", f"MLflow basic-auth + cache {MLFLOW_CACHE_TTL_S} s · NGINX"),
]


def render(results: dict, failures: dict, args, started: dt.datetime, command: str, took: float) -> str:
    lines = ["## Authenticated tracking: runyard behind NGINX vs MLflow basic-auth", "",
             f"`{command}` on {started:%Y-%m-%d %H:%M} UTC (took {took / 60:.1f} min), nproc "
             f"{os.cpu_count()} (load average {args.load:.1f} at the start: other work on the machine "
             "slows every row alike, the ratios are the figures to compare), SQLite backends, one server "
             f"worker each, NGINX rendered by `toolkit.nginx` ({os.cpu_count()} workers: `worker_processes "
             "auto`). Clients as the stock `mlflow` client: "
             "one keep-alive session, the credential on every request. *log-metric*: runs/log-metric one "
             f"after another, then {args.threads} client threads each with its own session; *runs/get*: "
             "reads of one run; loops capped at "
             f"{args.max_seconds:g} s after a warm-up. *first request, new credential*: runs/get from a new "
             f"session with a credential the server has never seen (median of {args.new_credentials}; a new "
             "token, a new htpasswd user, a new MLflow user). Every response in every loop was a 200; every "
             "protected row answered 401 to no credentials and to a wrong one before timing.", "",
             "| configuration | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values(r)) + " |")
    for label, why in failures.items():
        lines.append(f"| {label} | failed: {why} |" + " |" * (len(COLUMNS) - 1))
    pairs = [(a, b) for a, b in PAIRS if a in results and b in results]
    if pairs:
        lines += ["", "Ratios, runyard over MLflow, oriented so that >1 means runyard is better (rates: "
                  "runyard/MLflow; latencies: MLflow/runyard):", "",
                  "| runyard vs MLflow | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
        for ours, theirs in pairs:
            a, b = values(results[ours]), values(results[theirs])
            lines.append(f"| {ours} vs {theirs} | "
                         + " | ".join(ratio(x, y, h) for x, y, h in zip(a, b, HIGHER_IS_BETTER, strict=True))
                         + " |")
    lines += ["", "Who checks the credential:", ""]
    seen = set()
    for label, r in results.items():
        name = label.removesuffix(" · direct").removesuffix(" · NGINX")
        if r["how"] and name not in seen:
            seen.add(name)
            lines.append(f"- {name}: {r['how']}")
    lines += notes(results)
    return "\n".join(lines)


def notes(results: dict) -> list[str]:
    out = []
    direct = results.get("runyard · direct · no auth")
    for label in ("runyard · NGINX · no auth", "runyard · NGINX · token", "runyard · NGINX · basic"):
        if direct and label in results:
            cost = results[label]["log_metric"]["p50"] - direct["log_metric"]["p50"]
            out.append(f"- {label}: log-metric p50 {cost:+.2f} ms over runyard direct.")
    if out:
        out.insert(0, "")
        out.insert(1, "What the proxy and the check add (p50, sequential):")
        out.insert(2, "")
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    parser.add_argument("--max-seconds", type=float, help="cap on each timed loop (default 8, quick 1)")
    parser.add_argument("--threads", type=int, default=4, help="client threads of the concurrent loop")
    parser.add_argument("--new-credentials", type=int, help="never-seen credentials per row (default 5, "
                                                            "quick 2)")
    parser.add_argument("--only", choices=["runyard", "mlflow"], help="measure one side only")
    parser.add_argument("--no-mlflow-cache", action="store_true",
                        help="skip MLflow with its opt-in credential cache")
    parser.add_argument("--results", type=Path, help="default bench/RESULTS.md; bench/.work/RESULTS-quick.md "
                                                     "with --quick, so a smoke run never overwrites the "
                                                     "real figures")
    args = parser.parse_args(argv)
    args.max_seconds = args.max_seconds or (1.0 if args.quick else 8.0)
    args.new_credentials = args.new_credentials or (2 if args.quick else 5)
    results_path = args.results or (BENCH_DIR / ".work" / "RESULTS-quick.md" if args.quick
                                    else BENCH_DIR / "RESULTS.md")
    # A plain `kill` must still stop the servers: SIGTERM becomes SystemExit, so every `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = dt.datetime.now(dt.UTC)
    args.load = os.getloadavg()[0]
    t0 = time.perf_counter()
    shutil.rmtree(WORK, ignore_errors=True)  # one scratch folder, replaced by every run
    WORK.mkdir(parents=True)

    results: dict[str, dict] = {}
    failures: dict[str, str] = {}
    steps: list[tuple[str, Callable[[], None]]] = []
    if args.only != "mlflow":
        steps.append(("runyard", lambda: run_runyard(args, results)))
    if args.only != "runyard":
        steps.append(("MLflow basic-auth", lambda: run_mlflow(args, results, 0, direct=True)))
        if not args.no_mlflow_cache:
            steps.append((f"MLflow basic-auth + cache {MLFLOW_CACHE_TTL_S} s",
                          lambda: run_mlflow(args, results, MLFLOW_CACHE_TTL_S, direct=False)))
    for name, step in steps:
        try:
            step()
        except (AssertionError, ApiError, RuntimeError, RunyardError, requests.RequestException,
                OSError) as exc:
            # The gate or a loop failed: reported as such, never as a number.
            failures[name] = " ".join(str(exc).split())[:200]
            print(f"! {name}: {failures[name]}", flush=True)

    command = "python -m bench.auth" + (" " + " ".join(argv) if argv else "")
    text = render(results, failures, args, started, command, time.perf_counter() - t0)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    sections.write_section(results_path, "auth", text)
    print()
    print(text)
    print(f"\nwrote section 'auth' of {results_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
