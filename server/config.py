"""ServerConfig: one frozen dataclass built once from flags and environment, shared with the toolkit."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
from dataclasses import dataclass, field

PROXY_ROOT = "mlflow-artifacts:/"
CONFIG_ENV = "RUNYARD_SERVER_CONFIG"  # how the parent process hands the config to worker processes


@dataclass(frozen=True)
class ServerConfig:
    backend_store_uri: str = "./mlruns"
    default_artifact_root: str | None = None
    artifacts_destination: str = "./mlartifacts"
    serve_artifacts: bool = True
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 1
    static_prefix: str = ""
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    log_level: str = "info"
    # Addresses or networks of the reverse proxies whose X-Forwarded-User header names the request's user.
    trusted_proxies: tuple[str, ...] = field(default_factory=tuple)
    token_pepper_file: str | None = None  # the key bearer tokens are hashed with (runyard tokens)
    htpasswd_file: str | None = None  # basic-auth users checked for NGINX (runyard users)
    # --expose-prometheus: the folder of prometheus-client's multiprocess files; GET /metrics when set.
    expose_prometheus: str | None = None
    # --backend-store-password-file: the database password, read for every new connection and watched
    # for changes (server/store/dbpassword.py); the URI then holds none.
    backend_store_password_file: str | None = None

    def __post_init__(self) -> None:
        prefix = self.static_prefix.rstrip("/")
        if prefix and not prefix.startswith("/"):
            raise ValueError("--static-prefix must start with '/'")
        object.__setattr__(self, "static_prefix", prefix)
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"--trusted-proxies: {proxy!r} is not an address or network") from None
        if self.expose_prometheus is not None:
            if not self.expose_prometheus.strip():
                raise ValueError("--expose-prometheus needs a folder")
            # Absolute, so every worker process writes to the same folder whatever its working directory.
            folder = os.path.abspath(os.path.expanduser(self.expose_prometheus))
            if os.path.exists(folder) and not os.path.isdir(folder):
                raise ValueError(f"--expose-prometheus {folder} is a file, not a folder")
            object.__setattr__(self, "expose_prometheus", folder)
        if self.backend_store_password_file is not None:
            from server.errors import RunyardError
            from server.store.dbpassword import check_password_file

            try:  # absolute, so every worker process reads the same file whatever its working directory
                path = check_password_file(self.backend_store_uri, self.backend_store_password_file)
            except RunyardError as exc:
                raise ValueError(exc.message) from None
            object.__setattr__(self, "backend_store_password_file", path)

    @property
    def artifact_root(self) -> str:
        """The root new experiments' artifact locations are built from."""
        if self.default_artifact_root:
            return self.default_artifact_root
        if self.serve_artifacts:
            return PROXY_ROOT
        # Not proxied: clients write straight to the destination, so it must be an absolute location.
        if "://" in self.artifacts_destination or self.artifacts_destination.startswith("file:"):
            return self.artifacts_destination
        return os.path.abspath(self.artifacts_destination)

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ServerConfig:
        raw = (environ if environ is not None else os.environ).get(CONFIG_ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        for name in ("allowed_hosts", "trusted_proxies"):
            data[name] = tuple(data.get(name) or ())
        return cls(**data)
