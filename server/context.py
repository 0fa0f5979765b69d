"""What every handler can reach: the configuration, the tracking store and the proxied artifact store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.store.tracking import TrackingStore


@dataclass
class Context:
    config: ServerConfig
    store: TrackingStore
    models: Any = None  # server.store.logged_models.LoggedModelStore
    artifacts: Any = None  # server.artifacts.base.ArtifactRepository when --serve-artifacts is on
    tokens: Any = None  # server.store.tokens.TokenStore
    passwords: Any = None  # server.passwords.PasswordFile with --htpasswd
    metrics: Any = None  # server.prometheus.PrometheusMetrics with --expose-prometheus (not MLflow metrics)
