"""The pods of a runyard deployment: the server pod (runyard behind an NGINX sidecar) and the upgrade Job's.

The server binds to loopback, so the NGINX container of the same pod (TLS, auth through the server's
/_runyard/auth, body limits) is the only way in. Both containers run as fixed non-root ids on a read-only
root filesystem; everything they write goes to emptyDirs. Secrets are mounted as whole folders, never
with subPath: a mounted Secret then changes in place when it is rotated, and the server re-reads its
password, htpasswd and pepper files.
"""

from __future__ import annotations

import hashlib

from kubernetes import client as k8s

from infra.k8s.settings import KubernetesSettings, Resources, SecretRef
from toolkit.nginx import NginxSettings, render

SERVER_CONTAINER = "server"
NGINX_CONTAINER = "nginx"
UPGRADE_CONTAINER = "upgrade"
CONFIG_HASH_ANNOTATION = "runyard.dev/config-hash"

SERVER_PORT = 5000  # loopback only
HTTP_PORT, HTTPS_PORT = 8080, 8443  # NGINX; above 1024, so no capability is needed to bind them
# NGINX only proxies; "auto" would start one worker per CPU of the node, whatever the pod's limits.
NGINX_WORKERS = 2
SERVER_UID = 10001  # the runyard image's user (Dockerfile)
NGINX_UID = 101  # nginxinc/nginx-unprivileged's user
# Long enough for uploads in flight to finish after NGINX stops taking new connections.
TERMINATION_GRACE_S = 60
# Endpoints are removed asynchronously: keep serving this long after termination starts, so clients
# that still route to this pod are not refused.
PRE_STOP_SLEEP_S = 5

NGINX_CONF_DIR = "/etc/runyard/nginx"
NGINX_STATE_DIR = "/var/lib/runyard/nginx"
TLS_DIR = "/etc/runyard/tls"
HTPASSWD_FILE = "/etc/runyard/htpasswd/htpasswd"
PEPPER_FILE = "/etc/runyard/token-pepper/pepper"
DB_PASSWORD_FILE = "/etc/runyard/db-password/password"
KEYTAB_FILE = "/etc/runyard/kerberos/keytab"
KRB5_CONF_DIR = "/etc/runyard/krb5"
KRB5_CACHE_DIR = "/run/krb5"
DATA_DIR = "/data"
BACKUP_DIR = "/backups"
# Every backup the upgrade Job takes lands on one volume: keep the newest few so it never fills up.
BACKUPS_KEPT = 5
# Secret files belong to root, group the pod's fsGroup: the non-root users read them through the group.
# (0400 would be unreadable to them; the kubelet turns it into 0440 when fsGroup is set anyway,
# kubernetes/kubernetes#57923, so 0440 states what the pod really gets.) Nobody else reads them.
SECRET_MODE = 0o440


def selector_labels(settings: KubernetesSettings) -> dict[str, str]:
    """What the Deployment, Service, NetworkPolicy and PodDisruptionBudget select: the server pods only."""
    return {"app.kubernetes.io/name": "runyard", "app.kubernetes.io/instance": settings.name}


def nginx_conf(settings: KubernetesSettings) -> str:
    """nginx.conf of the sidecar. Rendered only: `nginx -t` would need the certificate files, which exist
    in the pod, not here (toolkit/nginx.py checks only in `write`)."""
    tls = settings.tls_secret is not None
    return render(NginxSettings(
        upstreams=(f"127.0.0.1:{SERVER_PORT}",),
        listen=f"0.0.0.0:{HTTPS_PORT if tls else HTTP_PORT}",
        auth=settings.auth,
        tls_cert=f"{TLS_DIR}/tls.crt" if tls else None,
        tls_key=f"{TLS_DIR}/tls.key" if tls else None,
        state_dir=NGINX_STATE_DIR,
        container=True,
        worker_processes=NGINX_WORKERS,
    ))


def config_hash(settings: KubernetesSettings) -> str:
    """What a running pod read once at start and the pod spec does not show: the NGINX configuration
    (NGINX does not reload a changed ConfigMap). In the pod template, a change rolls the pods."""
    return hashlib.sha256(nginx_conf(settings).encode()).hexdigest()


def proxy_port(settings: KubernetesSettings) -> tuple[str, int]:
    """(name, number) of the NGINX port, the pod's only open port."""
    return ("https", HTTPS_PORT) if settings.tls_secret else ("http", HTTP_PORT)


def allowed_hosts(settings: KubernetesSettings) -> list[str]:
    """Host headers the server accepts: the Service's DNS names, the Ingress host and the extra ones.
    With any allowed host given, the server no longer accepts bare IP addresses, hence the probes'
    `Host: localhost` (always accepted)."""
    service = settings.name
    hosts = [service, f"{service}.{settings.namespace}", f"{service}.{settings.namespace}.svc",
             f"{service}.{settings.namespace}.svc.cluster.local"]
    if settings.ingress is not None:
        hosts.append(settings.ingress.host)
    hosts.extend(settings.allowed_hosts)
    return list(dict.fromkeys(host.lower() for host in hosts))


# ---- pieces ------------------------------------------------------------------------------------------

def resources(spec: Resources) -> k8s.V1ResourceRequirements:
    limits = {"memory": spec.memory_limit}
    if spec.cpu_limit is not None:
        limits["cpu"] = spec.cpu_limit
    return k8s.V1ResourceRequirements(requests={"cpu": spec.cpu_request, "memory": spec.memory_request},
                                      limits=limits)


def container_security(uid: int) -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        run_as_non_root=True, run_as_user=uid, run_as_group=uid, allow_privilege_escalation=False,
        read_only_root_filesystem=True, privileged=False,
        capabilities=k8s.V1Capabilities(drop=["ALL"]),
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def pod_security() -> k8s.V1PodSecurityContext:
    return k8s.V1PodSecurityContext(
        run_as_non_root=True, run_as_user=SERVER_UID, run_as_group=SERVER_UID, fs_group=SERVER_UID,
        # only chown a volume when its top folder is not ours yet: a big /data would take minutes
        fs_group_change_policy="OnRootMismatch",
        seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def _empty_dir(name: str) -> k8s.V1Volume:
    return k8s.V1Volume(name=name, empty_dir=k8s.V1EmptyDirVolumeSource())


def _secret_file(name: str, ref: SecretRef, file: str) -> k8s.V1Volume:
    return k8s.V1Volume(name=name, secret=k8s.V1SecretVolumeSource(
        secret_name=ref.secret, items=[k8s.V1KeyToPath(key=ref.key, path=file)], default_mode=SECRET_MODE))


def _mount(name: str, path: str, read_only: bool = False) -> k8s.V1VolumeMount:
    return k8s.V1VolumeMount(name=name, mount_path=path, read_only=read_only or None)


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0]


def _file(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _pre_stop() -> k8s.V1Lifecycle:
    return k8s.V1Lifecycle(pre_stop=k8s.V1LifecycleHandler(sleep=k8s.V1SleepAction(seconds=PRE_STOP_SLEEP_S)))


class _Parts:
    """Volumes and mounts collected together, so a mount never names a missing volume."""

    def __init__(self) -> None:
        self.volumes: dict[str, k8s.V1Volume] = {}

    def mount(self, volume: k8s.V1Volume, path: str, read_only: bool = False) -> k8s.V1VolumeMount:
        self.volumes.setdefault(volume.name, volume)
        return _mount(volume.name, path, read_only)


def database_env(settings: KubernetesSettings, parts: _Parts) -> tuple[list, list]:
    """(env, mounts) for the database, the same in the server and the upgrade Job. Both read
    RUNYARD_BACKEND_STORE_URI and RUNYARD_BACKEND_STORE_PASSWORD_FILE; a secret URI comes from a
    secretKeyRef, so no manifest ever holds a password."""
    env, mounts = [], []
    if settings.backend_store_uri_secret is not None:
        ref = settings.backend_store_uri_secret
        env.append(k8s.V1EnvVar(name="RUNYARD_BACKEND_STORE_URI", value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=ref.secret, key=ref.key))))
    else:
        env.append(k8s.V1EnvVar(name="RUNYARD_BACKEND_STORE_URI", value=settings.backend_store_uri))
    if settings.backend_store_password_secret is not None:
        volume = _secret_file("db-password", settings.backend_store_password_secret, _file(DB_PASSWORD_FILE))
        mounts.append(parts.mount(volume, _folder(DB_PASSWORD_FILE), read_only=True))
        env.append(k8s.V1EnvVar(name="RUNYARD_BACKEND_STORE_PASSWORD_FILE", value=DB_PASSWORD_FILE))
    return env, mounts


def _env_from(settings: KubernetesSettings) -> list | None:
    if settings.env_secret is None:
        return None
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.env_secret))]


def data_volume(settings: KubernetesSettings) -> k8s.V1Volume:
    return k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=f"{settings.name}-data"))


# ---- the server pod ----------------------------------------------------------------------------------

def _probe(settings: KubernetesSettings, path: str, period: int, failures: int) -> k8s.V1Probe:
    # The kubelet reaches the pod address, not loopback: the probes go through NGINX, which leaves
    # /health and /ready open. Host: localhost passes the server's Host check whatever the pod address.
    return k8s.V1Probe(
        http_get=k8s.V1HTTPGetAction(
            path=path, port=proxy_port(settings)[1], scheme="HTTPS" if settings.tls_secret else "HTTP",
            http_headers=[k8s.V1HTTPHeader(name="Host", value="localhost")]),
        period_seconds=period, failure_threshold=failures, timeout_seconds=5)


def server_container(settings: KubernetesSettings, parts: _Parts) -> k8s.V1Container:
    args = ["server", "--host", "127.0.0.1", "--port", str(SERVER_PORT), "--workers", str(settings.workers),
            "--artifacts-destination", settings.artifacts_destination, "--serve-artifacts",
            "--trusted-proxies", "127.0.0.1", "--allowed-hosts", ",".join(allowed_hosts(settings))]
    env, mounts = database_env(settings, parts)
    mounts.append(parts.mount(_empty_dir("tmp"), "/tmp"))
    if settings.single_writer:
        mounts.append(parts.mount(data_volume(settings), DATA_DIR))
    if settings.htpasswd_secret is not None:
        volume = _secret_file("htpasswd", settings.htpasswd_secret, _file(HTPASSWD_FILE))
        mounts.append(parts.mount(volume, _folder(HTPASSWD_FILE), read_only=True))
        args += ["--htpasswd", HTPASSWD_FILE]
    if settings.token_pepper_secret is not None:
        volume = _secret_file("token-pepper", settings.token_pepper_secret, _file(PEPPER_FILE))
        mounts.append(parts.mount(volume, _folder(PEPPER_FILE), read_only=True))
        args += ["--token-pepper-file", PEPPER_FILE]
    if settings.kerberos is not None:
        kerberos = settings.kerberos
        keytab = _secret_file("kerberos-keytab", kerberos.keytab, _file(KEYTAB_FILE))
        krb5 = k8s.V1Volume(name="krb5-conf", config_map=k8s.V1ConfigMapVolumeSource(
            name=kerberos.krb5_config_map, items=[k8s.V1KeyToPath(key="krb5.conf", path="krb5.conf")]))
        mounts += [parts.mount(keytab, _folder(KEYTAB_FILE), read_only=True),
                   parts.mount(krb5, KRB5_CONF_DIR, read_only=True),
                   parts.mount(_empty_dir("krb5-cache"), KRB5_CACHE_DIR)]
        env += [k8s.V1EnvVar(name="RUNYARD_KERBEROS_KEYTAB", value=KEYTAB_FILE),
                k8s.V1EnvVar(name="RUNYARD_KERBEROS_PRINCIPAL", value=kerberos.principal),
                k8s.V1EnvVar(name="KRB5_CONFIG", value=f"{KRB5_CONF_DIR}/krb5.conf"),
                # the server keeps its tickets in memory; anything else that wants a cache gets this one
                k8s.V1EnvVar(name="KRB5CCNAME", value=f"FILE:{KRB5_CACHE_DIR}/ccache")]
    return k8s.V1Container(
        name=SERVER_CONTAINER, image=settings.image,
        # args only: the image's entrypoint (tini -- runyard) reaps the workers and forwards SIGTERM
        args=args, env=env, env_from=_env_from(settings), volume_mounts=mounts,
        resources=resources(settings.server_resources), security_context=container_security(SERVER_UID),
        # the server checks the database and opens its artifact store before it listens
        startup_probe=_probe(settings, "/health", period=5, failures=60),
        readiness_probe=_probe(settings, "/ready", period=10, failures=3),
        liveness_probe=_probe(settings, "/health", period=20, failures=3),
        lifecycle=_pre_stop())


def nginx_container(settings: KubernetesSettings, parts: _Parts) -> k8s.V1Container:
    name, port = proxy_port(settings)
    config = k8s.V1Volume(name="nginx-conf", config_map=k8s.V1ConfigMapVolumeSource(
        name=f"{settings.name}-nginx"))
    mounts = [parts.mount(config, NGINX_CONF_DIR, read_only=True),
              parts.mount(_empty_dir("nginx-state"), NGINX_STATE_DIR),
              parts.mount(_empty_dir("nginx-tmp"), "/tmp")]  # the image's own defaults point there
    if settings.tls_secret is not None:
        tls = k8s.V1Volume(name="tls", secret=k8s.V1SecretVolumeSource(
            secret_name=settings.tls_secret, default_mode=SECRET_MODE,
            items=[k8s.V1KeyToPath(key=key, path=key) for key in ("tls.crt", "tls.key")]))
        mounts.append(parts.mount(tls, TLS_DIR, read_only=True))
    socket = k8s.V1Probe(tcp_socket=k8s.V1TCPSocketAction(port=port), period_seconds=10, failure_threshold=3)
    return k8s.V1Container(
        name=NGINX_CONTAINER, image=settings.nginx_image,
        # nginx itself rather than the image's entrypoint script, which edits files under /etc/nginx
        command=["nginx", "-c", f"{NGINX_CONF_DIR}/nginx.conf"],
        ports=[k8s.V1ContainerPort(name=name, container_port=port, protocol="TCP")],
        volume_mounts=mounts, resources=resources(settings.nginx_resources),
        security_context=container_security(NGINX_UID),
        readiness_probe=socket, liveness_probe=socket, lifecycle=_pre_stop())


def _spread(settings: KubernetesSettings) -> list | None:
    """Spread server pods over nodes and zones when there can be several; ScheduleAnyway, so a small
    cluster still runs them all. matchLabelKeys: only the pods of the same rollout count."""
    if settings.max_replicas < 2:
        return None
    selector = k8s.V1LabelSelector(match_labels=selector_labels(settings))
    return [k8s.V1TopologySpreadConstraint(
        max_skew=1, topology_key=key, when_unsatisfiable="ScheduleAnyway", label_selector=selector,
        match_label_keys=["pod-template-hash"])
        for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]


def server_pod_spec(settings: KubernetesSettings) -> k8s.V1PodSpec:
    parts = _Parts()
    containers = [server_container(settings, parts), nginx_container(settings, parts)]
    return k8s.V1PodSpec(
        containers=containers, volumes=list(parts.volumes.values()),
        service_account_name=settings.name, automount_service_account_token=False,
        security_context=pod_security(), image_pull_secrets=_pull_secrets(settings),
        termination_grace_period_seconds=TERMINATION_GRACE_S,
        topology_spread_constraints=_spread(settings),
        # Service links would put e.g. RUNYARD_PORT=tcp://… (a Service named runyard) into the env, where
        # the server reads its RUNYARD_<OPTION> settings.
        enable_service_links=False)


def _pull_secrets(settings: KubernetesSettings) -> list | None:
    return [k8s.V1LocalObjectReference(name=name) for name in settings.image_pull_secrets] or None


# ---- the upgrade Job's pod ---------------------------------------------------------------------------

def upgrade_pod_spec(settings: KubernetesSettings) -> k8s.V1PodSpec:
    parts = _Parts()
    env, mounts = database_env(settings, parts)
    backups = k8s.V1Volume(name="backups", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=f"{settings.name}-backups"))
    mounts += [parts.mount(_empty_dir("tmp"), "/tmp"), parts.mount(backups, BACKUP_DIR)]
    affinity = None
    if settings.dialect == "sqlite":
        mounts.append(parts.mount(data_volume(settings), DATA_DIR))
        # A ReadWriteOnce volume attaches to one node: prefer the node of a server pod still holding it.
        affinity = k8s.V1Affinity(pod_affinity=k8s.V1PodAffinity(
            preferred_during_scheduling_ignored_during_execution=[k8s.V1WeightedPodAffinityTerm(
                weight=100, pod_affinity_term=k8s.V1PodAffinityTerm(
                    topology_key="kubernetes.io/hostname",
                    label_selector=k8s.V1LabelSelector(match_labels=selector_labels(settings))))]))
    # `db upgrade` reads the URI from RUNYARD_BACKEND_STORE_URI and the password file from
    # RUNYARD_BACKEND_STORE_PASSWORD_FILE: neither reaches the process's argv.
    args = ["db", "upgrade", "--backup-to", BACKUP_DIR,
            "--keep", str(BACKUPS_KEPT), "--yes"]
    container = k8s.V1Container(
        name=UPGRADE_CONTAINER, image=settings.image, args=args, env=env, env_from=_env_from(settings),
        volume_mounts=mounts, resources=resources(settings.server_resources),
        security_context=container_security(SERVER_UID))
    return k8s.V1PodSpec(
        containers=[container], volumes=list(parts.volumes.values()), restart_policy="Never",
        service_account_name=settings.name, automount_service_account_token=False,
        security_context=pod_security(), image_pull_secrets=_pull_secrets(settings),
        affinity=affinity, enable_service_links=False)
