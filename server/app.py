"""Builds the ASGI application: routing, request decoding, the error envelope, access logging, host checks.

The hot path is deliberately thin: one dict lookup for the route, orjson for decoding and encoding, and
one hop to the worker thread pool where the (blocking) store call and the encoding run together.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import orjson
from starlette.requests import Request
from starlette.responses import Response

from server.api import errors
from server.api.message import Message
from server.api.routing import Route, Router
from server.config import ServerConfig
from server.context import Context
from server.errors import RunyardError

access_log = logging.getLogger("runyard.access")
log = logging.getLogger("runyard.server")

_JSON_TYPES = ("application/json",)
QUIET_ROUTES = frozenset({"/_runyard/auth", "/health", "/ready", "/metrics"})
_BODY_METHODS = ("POST", "PUT")
UNMATCHED_ROUTE = "unmatched"  # the route label of requests no route serves


def all_routes() -> list[Route]:
    from server.api import artifacts, auth, experiments, health, metrics, models, run_artifacts, runs

    return [*health.ROUTES, *auth.ROUTES, *experiments.ROUTES, *runs.ROUTES, *metrics.ROUTES, *models.ROUTES,
            *artifacts.ROUTES,
            *run_artifacts.ROUTES]


def build_context(config: ServerConfig) -> Context:
    from migrations.runner import ensure_schema
    from server.artifacts import repository_for
    from server.passwords import PasswordFile
    from server.store.dbpassword import warn_if_exposed
    from server.store.logged_models import LoggedModelStore
    from server.store.tokens import TokenStore, load_pepper
    from server.store.tracking import TrackingStore
    from server.store.uri import create_engine

    if config.backend_store_password_file:
        warn_if_exposed(config.backend_store_password_file)
    engine = create_engine(config.backend_store_uri, password_file=config.backend_store_password_file)
    ensure_schema(engine, config.backend_store_uri)
    store = TrackingStore(engine, config.artifact_root)
    store.ensure_default_experiment()
    artifacts = repository_for(config.artifacts_destination) if config.serve_artifacts else None
    passwords = PasswordFile(config.htpasswd_file) if config.htpasswd_file else None
    return Context(config=config, store=store, models=LoggedModelStore(store), artifacts=artifacts,
                   tokens=TokenStore(store, load_pepper(config.token_pepper_file)), passwords=passwords)


class RunyardApp:
    def __init__(self, config: ServerConfig, context: Context | None = None):
        self.config = config
        # Prometheus or not is decided here, once: without it no request makes a metric call.
        self.metrics = _prometheus(config)
        self.router = Router(all_routes() + (self.metrics.routes() if self.metrics else []))
        self.prefix = config.static_prefix
        self.context = context
        if context is not None:
            self._attach_metrics()
        self.executor = ThreadPoolExecutor(max_workers=int(os.environ.get("RUNYARD_THREADS", "16")),
                                           thread_name_prefix="runyard")
        self.host_allowed = host_checker(config)
        self.forwarded_user = forwarded_user_reader(config)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.context is None:
                        self.context = build_context(self.config)
                        self._attach_metrics()
                except Exception as exc:  # refuse to serve, with a message and no traceback
                    text = exc.message if isinstance(exc, RunyardError) else f"{type(exc).__name__}: {exc}"
                    log.error("cannot start: %s", text)
                    await send({"type": "lifespan.startup.failed", "message": text})
                    return
                if self.metrics is not None:
                    self.metrics.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.metrics is not None:
                    self.metrics.stop()
                self.executor.shutdown(wait=False, cancel_futures=True)
                if self.context is not None and self.context.store is not None:
                    self.context.store.engine.dispose()
                if self.context is not None and self.context.artifacts is not None:
                    await self.context.artifacts.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _attach_metrics(self) -> None:
        if self.metrics is not None:
            self.context.metrics = self.metrics
            if self.context.store is not None:
                self.metrics.watch_pool(self.context.store.engine)

    async def handle(self, scope, receive, send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        request_id = _request_id(request)
        status_box = [500]

        async def send_with_status(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        template = "-"
        user = self.forwarded_user(scope, request.headers)
        try:
            if not self.host_allowed(request.headers.get("host", "")):
                response = errors.error_response(
                    "PERMISSION_DENIED", "Host header not allowed; add it to --allowed-hosts.")
            else:
                path = scope["path"]
                if self.prefix:
                    path = path[len(self.prefix):] if path.startswith(self.prefix + "/") else ""
                match = self.router.match(path)
                if match is None:
                    response = errors.error_response(
                        "ENDPOINT_NOT_FOUND", f"No API endpoint at {scope['path']}")
                else:
                    template, methods, path_params = match
                    route = methods.get(request.method) or (
                        methods.get("GET") if request.method == "HEAD" else None)
                    if route is None:
                        response = errors.error_response(
                            "ENDPOINT_NOT_FOUND",
                            f"Method {request.method} is not allowed for {scope['path']}", 405)
                    else:
                        response = await self.dispatch(route, request, path_params, user)
        except Exception as exc:  # handlers raise RunyardError for client mistakes
            response = errors.from_exception(exc)
        await response(scope, receive, send_with_status)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # NGINX checks credentials before every request it forwards, and probes poll: log only their
        # failures, or the log would be mostly checks.
        level = logging.DEBUG if template in QUIET_ROUTES and status_box[0] < 400 else logging.INFO
        access_log.log(level, "%s %s %d %.1fms rid=%s user=%s", request.method, template, status_box[0],
                       elapsed_ms, request_id, user or "-")
        if self.metrics is not None:
            self.metrics.observe_request(template if template != "-" else UNMATCHED_ROUTE, request.method,
                                         status_box[0], elapsed_ms / 1000)

    async def dispatch(self, route: Route, request: Request, path_params: dict, user: str | None
                       ) -> Response:
        if route.raw:
            return await route.handler(request, self.context, **path_params)
        message = await _decode(request)
        message.user = user
        if path_params:
            message.data.update(path_params)
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(self.executor, _call_json, route.handler, message, self.context)
        return Response(body, media_type="application/json")


def _call_json(handler, message: Message, context: Context) -> bytes:
    return orjson.dumps(handler(message, context))


async def _decode(request: Request) -> Message:
    if request.method == "GET" or (request.method == "DELETE" and request.url.query):
        if request.url.query:
            return Message.from_query_items(request.query_params.multi_items())
    if request.method in _BODY_METHODS:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in _JSON_TYPES:
            raise RunyardError("Bad Request. Content-Type must be one of ['application/json']",
                               "INVALID_PARAMETER_VALUE")
    return await Message.from_request_body(request)


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 64 and given.replace("-", "").isalnum():
        return given
    return uuid.uuid4().hex[:16]


def host_checker(config: ServerConfig):
    """Host-header allow-list (DNS rebinding guard). Default: loopback, private addresses, the bind host."""
    allowed = [h.lower() for h in config.allowed_hosts]
    if "*" in allowed:
        return lambda host: True
    defaults = {"localhost", config.host.lower()}

    def check(host_header: str) -> bool:
        host = _hostname(host_header.lower())
        if host in defaults or host in allowed:
            return True
        if any(pattern.startswith("*.") and host.endswith(pattern[1:]) for pattern in allowed):
            return True
        if allowed:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or address.is_private

    return check


def forwarded_user_reader(config: ServerConfig):
    """X-Forwarded-User, believed only on connections from --trusted-proxies (anyone else could send it)."""
    networks = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a unix socket
            return False
        return any(ip in network for network in networks)

    def read(scope, headers) -> str | None:
        if not networks:
            return None
        value = headers.get("x-forwarded-user", "").strip()
        client = scope.get("client")
        if not value or not client or not trusted(client[0]):
            return None
        # ASGI hands header bytes over as latin-1; NGINX passes the user name's UTF-8 bytes through.
        value = value.encode("latin-1").decode("utf-8", "replace")
        return value[:255] if value.isprintable() else None

    return read


def _hostname(host_header: str) -> str:
    """The name or address of a Host header, without the port: "[::1]:80" -> "::1", "a:80" -> "a"."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    if host_header.count(":") == 1:
        return host_header.rsplit(":", 1)[0]
    return host_header


def _prometheus(config: ServerConfig):
    if not config.expose_prometheus:
        return None
    from server.prometheus import PrometheusMetrics

    return PrometheusMetrics(config.expose_prometheus)


def create_app(config: ServerConfig | None = None) -> RunyardApp:
    """The app for uvicorn; worker processes rebuild the config from the environment."""
    return RunyardApp(config or ServerConfig.from_env())
