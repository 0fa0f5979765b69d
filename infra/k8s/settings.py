"""What a Kubernetes deployment of runyard is made of: one validated value, built from flags or runyard.yaml.

Every check that needs no cluster happens here, so a bad setting is one clear error before anything is
applied. Checks that need the cluster (does a referenced Secret exist?) belong to toolkit/deploy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

NAME_MAX = 40  # room for the longest suffix we add ("-upgrade-0123456789") under the 63-character limit
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
SERVER_DIALECTS = ("postgresql", "mysql", "mariadb", "mssql")


class SettingsError(ValueError):
    """A deployment setting that cannot work; the message names the setting and what to do."""


@dataclass(frozen=True)
class SecretRef:
    """One key of a Kubernetes Secret in the deployment's namespace, written SECRET/KEY."""

    secret: str
    key: str

    @classmethod
    def parse(cls, text: str, setting: str) -> SecretRef:
        secret, slash, key = (text or "").partition("/")
        valid = slash and _SECRET_NAME.fullmatch(secret) and len(secret) <= 253 and _SECRET_KEY.fullmatch(key)
        if not valid:
            raise SettingsError(f"{setting}: {text!r} is not SECRET/KEY (a Secret's name, a slash, one of "
                                "its keys), e.g. runyard-db/uri.")
        return cls(secret, key)

    def __str__(self) -> str:
        return f"{self.secret}/{self.key}"


@dataclass(frozen=True)
class Resources:
    """Requests and limits of one container (Kubernetes quantities, e.g. 500m, 1Gi)."""

    cpu_request: str
    memory_request: str
    cpu_limit: str | None  # None: no CPU limit (throttling hurts latency more than it protects)
    memory_limit: str


@dataclass(frozen=True)
class Autoscaling:
    """A HorizontalPodAutoscaler between min and max replicas on average CPU use."""

    min_replicas: int
    max_replicas: int
    cpu_utilization: int = 70


@dataclass(frozen=True)
class Kerberos:
    """HDFS behind Kerberos: a keytab Secret and a krb5.conf ConfigMap mounted into the server."""

    keytab: SecretRef
    krb5_config_map: str  # a ConfigMap with the key krb5.conf
    principal: str  # MLFLOW_KERBEROS_USER, e.g. runyard@EXAMPLE.COM


@dataclass(frozen=True)
class Ingress:
    host: str
    class_name: str | None = None
    tls_secret: str | None = None  # a kubernetes.io/tls Secret for the Ingress
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KubernetesSettings:
    name: str
    namespace: str
    image: str  # the runyard image, with a tag or digest (never :latest)
    artifacts_destination: str
    replicas: int = 2
    # The database: exactly one of a URI Secret (password inside) or a plain URI without a password,
    # optionally with a password Secret mounted as a file (rotatable without a restart).
    backend_store_uri_secret: SecretRef | None = None
    backend_store_uri: str | None = None
    backend_store_password_secret: SecretRef | None = None
    create_namespace: bool = False
    auth: str = "basic+token"  # basic | token | basic+token (NGINX in front of every request)
    htpasswd_secret: SecretRef | None = None  # needed for basic
    token_pepper_secret: SecretRef | None = None
    tls_secret: str | None = None  # kubernetes.io/tls Secret: NGINX in the pod terminates TLS
    ingress: Ingress | None = None
    autoscaling: Autoscaling | None = None
    workers: int = 2  # server worker processes per pod
    server_resources: Resources = Resources("500m", "512Mi", None, "1Gi")
    nginx_resources: Resources = Resources("100m", "64Mi", None, "256Mi")
    nginx_image: str = "nginxinc/nginx-unprivileged:1.27.3-alpine"
    env_secret: str | None = None  # a Secret whose keys become environment variables (cloud credentials)
    service_account_annotations: dict[str, str] = field(default_factory=dict)  # e.g. IRSA's role ARN
    image_pull_secrets: tuple[str, ...] = ()
    kerberos: Kerberos | None = None
    data_volume_size: str = "10Gi"  # SQLite and local artifacts live on a PersistentVolumeClaim
    backup_volume_size: str = "20Gi"  # where the upgrade Job writes its backup first
    storage_class: str | None = None
    allowed_ingress_namespaces: tuple[str, ...] = ()  # NetworkPolicy: who may reach NGINX (empty: any)
    # Further Host names clients use (a load balancer's DNS name, another cluster domain): the server
    # answers only the Service's names, the Ingress host and these (its DNS-rebinding guard).
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_label(self.name, "--name", NAME_MAX)
        _check_label(self.namespace, "--namespace", 63)
        _check_image(self.image, "--image")
        _check_image(self.nginx_image, "nginx_image")
        if self.replicas < 1:
            raise SettingsError("--replicas: at least 1.")
        if self.workers < 1:
            raise SettingsError("workers: at least 1.")
        if self.auth not in ("basic", "token", "basic+token"):
            raise SettingsError(f"auth: {self.auth!r} is not one of basic, token, basic+token.")
        if "basic" in self.auth and self.htpasswd_secret is None:
            raise SettingsError(f"auth {self.auth} needs htpasswd_secret (SECRET/KEY of an htpasswd file; "
                                "`runyard users add` writes one).")
        self._check_database()
        self._check_artifacts()
        if self.autoscaling is not None:
            scale = self.autoscaling
            if not 1 <= scale.min_replicas <= scale.max_replicas or scale.max_replicas < 2:
                raise SettingsError("autoscaling: need 1 <= min_replicas <= max_replicas and "
                                    "max_replicas >= 2.")
            if not 1 <= scale.cpu_utilization <= 100:
                raise SettingsError("autoscaling: cpu_utilization is a percentage (1-100).")
        for size, setting in ((self.data_volume_size, "data_volume_size"),
                              (self.backup_volume_size, "backup_volume_size")):
            _check_quantity(size, setting)
        for resources, setting in ((self.server_resources, "server_resources"),
                                   (self.nginx_resources, "nginx_resources")):
            for item in fields(resources):
                value = getattr(resources, item.name)
                if value is not None:
                    _check_quantity(value, f"{setting}.{item.name}")
        for host in self.allowed_hosts:
            if len(host) > 253 or not _HOST.fullmatch(host):
                raise SettingsError(f"allowed_hosts: {host!r} is not a lower-case host name (or *.domain).")
        if self.kerberos is not None and not self.artifacts_destination.startswith("hdfs://"):
            raise SettingsError("kerberos: only used with an hdfs:// --artifacts-destination.")

    # ---- derived facts the manifests and the deploy target share ----

    @property
    def dialect(self) -> str | None:
        """The database dialect when the URI is known here; None when it sits in a Secret."""
        if self.backend_store_uri is None:
            return None
        return _dialect(self.backend_store_uri)

    @property
    def single_writer(self) -> bool:
        """SQLite (or local artifacts) on a ReadWriteOnce volume: one pod, replaced rather than rolled."""
        return self.dialect == "sqlite" or self.local_artifacts

    @property
    def local_artifacts(self) -> bool:
        return urlsplit(self.artifacts_destination).scheme in ("", "file")

    @property
    def max_replicas(self) -> int:
        return self.autoscaling.max_replicas if self.autoscaling else self.replicas

    def _check_database(self) -> None:
        if (self.backend_store_uri_secret is None) == (self.backend_store_uri is None):
            raise SettingsError("Give exactly one of --backend-store-uri-secret SECRET/KEY (a database URI "
                                "in a Secret) or --backend-store-uri (a URI without a password).")
        if self.backend_store_uri is not None:
            uri = urlsplit(self.backend_store_uri)
            dialect = _dialect(self.backend_store_uri)
            if dialect not in (*SERVER_DIALECTS, "sqlite"):
                raise SettingsError(f"--backend-store-uri: {uri.scheme or 'a folder'} is not a database URI "
                                    "(postgresql://, mysql://, mariadb://, mssql:// or sqlite:////data/…).")
            if uri.password:
                raise SettingsError("--backend-store-uri holds a password: put the URI in a Secret "
                                    "(--backend-store-uri-secret) or the password alone in "
                                    "--backend-store-password-secret.")
            if dialect == "sqlite" and self.backend_store_password_secret is not None:
                raise SettingsError("--backend-store-password-secret: SQLite has no password.")
        if self.single_writer and self.max_replicas > 1:
            what = "SQLite" if self.dialect == "sqlite" else "A local --artifacts-destination"
            raise SettingsError(f"{what} lives on one ReadWriteOnce volume and allows one server pod: use "
                                "--replicas 1 without autoscaling, or PostgreSQL/MySQL and an object store.")

    def _check_artifacts(self) -> None:
        destination = urlsplit(self.artifacts_destination)
        if destination.scheme in ("", "file"):
            if not destination.path.startswith("/data/"):
                raise SettingsError("--artifacts-destination: a local destination must be under /data/ (the "
                                    "pod's data volume), e.g. /data/artifacts.")
        elif destination.scheme not in ("s3", "gs", "wasbs", "hdfs", "ftp", "sftp"):
            raise SettingsError(f"--artifacts-destination: {destination.scheme}:// is not a supported store "
                                "(s3, gs, wasbs, hdfs, ftp, sftp, or a /data/ path).")
        if destination.password:
            raise SettingsError("--artifacts-destination holds a password: give credentials through "
                                "env_secret instead.")


def _dialect(uri: str) -> str:
    return urlsplit(uri).scheme.split("+", 1)[0]


def _check_label(value: str, setting: str, limit: int) -> None:
    if not value or len(value) > limit or not _DNS_LABEL.fullmatch(value):
        raise SettingsError(f"{setting}: {value!r} is not a valid name (lower-case letters, digits and '-', "
                            f"starting with a letter, at most {limit} characters).")


def _check_image(image: str, setting: str) -> None:
    if not image or any(ch.isspace() for ch in image):
        raise SettingsError(f"{setting}: an image reference is required.")
    if "@sha256:" in image:
        return
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if not tag or tag == "latest":
        raise SettingsError(f"{setting}: {image!r} has no fixed tag; pin a version or a digest "
                            "(…:1.4.2 or …@sha256:…), never :latest, so every pod runs the same code.")


def _check_quantity(value: str, setting: str) -> None:
    if not _QUANTITY.fullmatch(value or ""):
        raise SettingsError(f"{setting}: {value!r} is not a Kubernetes quantity (e.g. 500m, 1Gi).")
