"""Every Kubernetes object of a runyard deployment, built from the client's typed models.

`build(settings)` returns them in apply order: the supporting objects, then the upgrade Job (which must
succeed before new server code meets the database), then the Deployment. `to_dicts` and `to_yaml` turn
them into what the API server or a GitOps repository takes. The pods themselves are in pod.py.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import yaml
from kubernetes import client as k8s

from infra.k8s.pod import (
    CONFIG_HASH_ANNOTATION,
    NGINX_CONTAINER,
    SERVER_CONTAINER,
    config_hash,
    nginx_conf,
    proxy_port,
    selector_labels,
    server_pod_spec,
    upgrade_pod_spec,
)
from infra.k8s.settings import KubernetesSettings

__all__ = ["CONFIG_HASH_ANNOTATION", "NGINX_CONTAINER", "SERVER_CONTAINER", "Manifests", "build",
           "selector_labels", "to_dicts", "to_yaml", "upgrade_job_name"]

# A stuck upgrade (a lock never released, a database that stopped answering) fails the Job instead of
# hanging the deploy forever; a backup and migration of a large database fit well within it.
UPGRADE_DEADLINE_S = 6 * 3600
# Finished upgrade Jobs stay a few days, so `runyard deploy … status` can show the last one and its logs.
UPGRADE_TTL_S = 3 * 24 * 3600
MANAGED_BY = "runyard"


@dataclass(frozen=True)
class Manifests:
    supporting: tuple[object, ...]  # applied first, in this order
    upgrade_job: k8s.V1Job
    deployment: k8s.V1Deployment

    @property
    def objects(self) -> tuple[object, ...]:
        return (*self.supporting, self.upgrade_job, self.deployment)


def upgrade_job_name(settings: KubernetesSettings) -> str:
    """One Job per image: a Job cannot be changed once created, and a new image needs its own upgrade."""
    return f"{settings.name}-upgrade-{hashlib.sha256(settings.image.encode()).hexdigest()[:10]}"


def version_label(image: str) -> str:
    """The image's tag, else the start of its digest, as a label value (63 characters, alphanumeric ends)."""
    reference, _, digest = image.partition("@")
    version = reference.rsplit("/", 1)[-1].partition(":")[2] or digest.replace(":", "-")[:19]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", version)[:63].strip("-_.")


def labels(settings: KubernetesSettings, component: str) -> dict[str, str]:
    return {**selector_labels(settings), "app.kubernetes.io/managed-by": MANAGED_BY,
            "app.kubernetes.io/version": version_label(settings.image),
            "app.kubernetes.io/component": component}


def _meta(settings: KubernetesSettings, name: str, component: str, annotations: dict | None = None,
          namespaced: bool = True) -> k8s.V1ObjectMeta:
    return k8s.V1ObjectMeta(name=name, namespace=settings.namespace if namespaced else None,
                            labels=labels(settings, component), annotations=annotations or None)


# ---- the supporting objects ---------------------------------------------------------------------------

def _namespace(settings: KubernetesSettings) -> k8s.V1Namespace:
    meta = _meta(settings, settings.namespace, "namespace", namespaced=False)
    # Our pods meet the "restricted" Pod Security Standard; enforcing it keeps the namespace that way.
    meta.labels.update({"pod-security.kubernetes.io/enforce": "restricted",
                        "pod-security.kubernetes.io/warn": "restricted"})
    return k8s.V1Namespace(api_version="v1", kind="Namespace", metadata=meta)


def _service_account(settings: KubernetesSettings) -> k8s.V1ServiceAccount:
    # No API token in the pods: the server never talks to Kubernetes. IRSA and workload identity inject
    # their own tokens, driven by the annotations.
    return k8s.V1ServiceAccount(
        api_version="v1", kind="ServiceAccount", automount_service_account_token=False,
        metadata=_meta(settings, settings.name, "server", dict(settings.service_account_annotations)))


def _nginx_config_map(settings: KubernetesSettings) -> k8s.V1ConfigMap:
    return k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", data={"nginx.conf": nginx_conf(settings)},
                           metadata=_meta(settings, f"{settings.name}-nginx", "proxy"))


def _claim(settings: KubernetesSettings, name: str, component: str, size: str) -> k8s.V1PersistentVolumeClaim:
    return k8s.V1PersistentVolumeClaim(
        api_version="v1", kind="PersistentVolumeClaim", metadata=_meta(settings, name, component),
        spec=k8s.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], storage_class_name=settings.storage_class,
            resources=k8s.V1VolumeResourceRequirements(requests={"storage": size})))


def _service(settings: KubernetesSettings) -> k8s.V1Service:
    name, _ = proxy_port(settings)
    return k8s.V1Service(
        api_version="v1", kind="Service", metadata=_meta(settings, settings.name, "server"),
        spec=k8s.V1ServiceSpec(
            type="ClusterIP", selector=selector_labels(settings),
            ports=[k8s.V1ServicePort(name=name, port=443 if name == "https" else 80, target_port=name,
                                     protocol="TCP")]))


def _network_policy(settings: KubernetesSettings) -> k8s.V1NetworkPolicy:
    """Only NGINX's port is reachable, from the allowed namespaces (an Ingress controller's included)
    or from anywhere. Egress stays open: the database and the object store live outside the cluster."""
    peers = None
    if settings.allowed_ingress_namespaces:
        peers = [k8s.V1NetworkPolicyPeer(namespace_selector=k8s.V1LabelSelector(match_expressions=[
            k8s.V1LabelSelectorRequirement(key="kubernetes.io/metadata.name", operator="In",
                                           values=list(settings.allowed_ingress_namespaces))]))]
    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1", kind="NetworkPolicy",
        metadata=_meta(settings, settings.name, "server"),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels=selector_labels(settings)),
            policy_types=["Ingress"],
            ingress=[k8s.V1NetworkPolicyIngressRule(
                _from=peers, ports=[k8s.V1NetworkPolicyPort(port=proxy_port(settings)[1], protocol="TCP")])]))


def _disruption_budget(settings: KubernetesSettings) -> k8s.V1PodDisruptionBudget:
    """maxUnavailable 1 for every shape: node drains take server pods one at a time, and never stall.
    minAvailable 1 would block a drain outright whenever a single pod runs (one replica, an HPA at its
    minimum, the single-writer SQLite pod, whose volume has to move with it anyway). AlwaysAllow lets a
    drain evict pods that are not ready, which the budget would otherwise protect."""
    return k8s.V1PodDisruptionBudget(
        api_version="policy/v1", kind="PodDisruptionBudget",
        metadata=_meta(settings, settings.name, "server"),
        spec=k8s.V1PodDisruptionBudgetSpec(
            max_unavailable=1, selector=k8s.V1LabelSelector(match_labels=selector_labels(settings)),
            unhealthy_pod_eviction_policy="AlwaysAllow"))


def _autoscaler(settings: KubernetesSettings) -> k8s.V2HorizontalPodAutoscaler:
    scale = settings.autoscaling
    # The server container's CPU alone: the pod's total would count NGINX's request too.
    metric = k8s.V2MetricSpec(
        type="ContainerResource", container_resource=k8s.V2ContainerResourceMetricSource(
            container=SERVER_CONTAINER, name="cpu",
            target=k8s.V2MetricTarget(type="Utilization", average_utilization=scale.cpu_utilization)))
    return k8s.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2", kind="HorizontalPodAutoscaler",
        metadata=_meta(settings, settings.name, "server"),
        spec=k8s.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k8s.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment",
                                                               name=settings.name),
            min_replicas=scale.min_replicas, max_replicas=scale.max_replicas, metrics=[metric]))


def _ingress(settings: KubernetesSettings) -> k8s.V1Ingress:
    ingress = settings.ingress
    annotations = dict(ingress.annotations)
    if ingress.class_name == "nginx":
        # ingress-nginx's defaults (1m bodies, buffered to its disk) break artifact uploads; the NGINX in
        # our pod enforces the limits. A backend speaking TLS must be named so.
        annotations.setdefault("nginx.ingress.kubernetes.io/proxy-body-size", "0")
        annotations.setdefault("nginx.ingress.kubernetes.io/proxy-request-buffering", "off")
        if settings.tls_secret:
            annotations.setdefault("nginx.ingress.kubernetes.io/backend-protocol", "HTTPS")
    backend = k8s.V1IngressBackend(service=k8s.V1IngressServiceBackend(
        name=settings.name, port=k8s.V1ServiceBackendPort(name=proxy_port(settings)[0])))
    tls = None
    if ingress.tls_secret:
        tls = [k8s.V1IngressTLS(hosts=[ingress.host], secret_name=ingress.tls_secret)]
    return k8s.V1Ingress(
        api_version="networking.k8s.io/v1", kind="Ingress",
        metadata=_meta(settings, settings.name, "server", annotations),
        spec=k8s.V1IngressSpec(ingress_class_name=ingress.class_name, tls=tls, rules=[k8s.V1IngressRule(
            host=ingress.host, http=k8s.V1HTTPIngressRuleValue(paths=[k8s.V1HTTPIngressPath(
                path="/", path_type="Prefix", backend=backend)]))]))


# ---- the upgrade Job and the Deployment ---------------------------------------------------------------

def _upgrade_job(settings: KubernetesSettings) -> k8s.V1Job:
    # The Job's pods leave out app.kubernetes.io/instance (runyard.dev/instance instead), so nothing that
    # selects the server pods by selector_labels (Service, PodDisruptionBudget, NetworkPolicy, status
    # queries) ever picks up an upgrade pod.
    pod_labels = {key: value for key, value in labels(settings, "upgrade").items()
                  if key != "app.kubernetes.io/instance"}
    pod_labels["runyard.dev/instance"] = settings.name
    return k8s.V1Job(
        api_version="batch/v1", kind="Job", metadata=_meta(settings, upgrade_job_name(settings), "upgrade"),
        spec=k8s.V1JobSpec(
            # `db upgrade` restores the database itself when it fails; a blind second attempt is not wanted.
            backoff_limit=0, active_deadline_seconds=UPGRADE_DEADLINE_S,
            ttl_seconds_after_finished=UPGRADE_TTL_S,
            template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=pod_labels),
                                           spec=upgrade_pod_spec(settings))))


def _deployment(settings: KubernetesSettings) -> k8s.V1Deployment:
    if settings.single_writer:
        # One ReadWriteOnce volume: the old pod must let go of it before the new one starts.
        strategy = k8s.V1DeploymentStrategy(type="Recreate")
    else:
        # A new pod is ready before an old one goes: capacity never drops during a rollout.
        rolling = k8s.V1RollingUpdateDeployment(max_unavailable=0, max_surge=1)
        strategy = k8s.V1DeploymentStrategy(type="RollingUpdate", rolling_update=rolling)
    # With an HPA, replicas is left out: the HPA owns it. Set here, every apply (server-side apply owns the
    # field) would reset the count the HPA chose, dropping pods under load until it scales up again.
    replicas = None if settings.autoscaling else settings.replicas
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels(settings, "server"),
                                  annotations={CONFIG_HASH_ANNOTATION: config_hash(settings)}),
        spec=server_pod_spec(settings))
    return k8s.V1Deployment(
        api_version="apps/v1", kind="Deployment", metadata=_meta(settings, settings.name, "server"),
        spec=k8s.V1DeploymentSpec(
            replicas=replicas, selector=k8s.V1LabelSelector(match_labels=selector_labels(settings)),
            strategy=strategy, revision_history_limit=5, template=template))


def build(settings: KubernetesSettings) -> Manifests:
    supporting: list[object] = []
    if settings.create_namespace:
        supporting.append(_namespace(settings))
    supporting += [_service_account(settings), _nginx_config_map(settings)]
    if settings.single_writer:
        supporting.append(_claim(settings, f"{settings.name}-data", "storage", settings.data_volume_size))
    supporting += [_claim(settings, f"{settings.name}-backups", "backup", settings.backup_volume_size),
                   _service(settings), _network_policy(settings), _disruption_budget(settings)]
    if settings.autoscaling is not None:
        supporting.append(_autoscaler(settings))
    if settings.ingress is not None:
        supporting.append(_ingress(settings))
    return Manifests(tuple(supporting), _upgrade_job(settings), _deployment(settings))


# ---- output -------------------------------------------------------------------------------------------

def to_dicts(objects) -> list[dict]:
    """The JSON-ready form of each object, as the API server takes it."""
    api = k8s.ApiClient()
    documents = []
    for obj in objects:
        document = api.sanitize_for_serialization(obj)
        if not document.get("apiVersion") or not document.get("kind"):
            raise ValueError(f"{type(obj).__name__} has no apiVersion or kind")
        head = {key: document.pop(key) for key in ("apiVersion", "kind", "metadata") if key in document}
        documents.append({**head, **document})  # reads as people write manifests
    return documents


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # nginx.conf reads as itself in a GitOps repository (PyYAML falls back to quotes where it must)
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def to_yaml(objects) -> str:
    """Multi-document YAML of the objects, for `--dry-run` and GitOps repositories."""
    return yaml.dump_all(to_dicts(objects), Dumper=_Dumper, sort_keys=False, explicit_start=True)
