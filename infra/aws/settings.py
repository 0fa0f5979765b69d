"""What the AWS side of a production runyard is made of: one validated value, from flags or runyard.yaml.

Every check that needs no AWS account happens here, so a bad setting is one clear error before the Pulumi
engine starts (an engine error arrives minutes later, half-way through a deployment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

NAME_MAX = 40  # the longest name AWS then accepts: "<name>-artifacts-<7 random>" must fit S3's 63
_NAME = re.compile(r"^[a-z](?:[a-z0-9]|-(?=[a-z0-9]))*$")  # RDS identifiers forbid "--" and a trailing "-"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_VPC = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SECURITY_GROUP = re.compile(r"^sg-[0-9a-f]{8,17}$")
_OIDC_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:oidc-provider/(?P<host>[^\s*]+)$")
_INSTANCE_CLASS = re.compile(r"^db\.[a-z0-9-]+\.[a-z0-9]+$")
_ENGINE_VERSION = re.compile(r"^(?P<major>\d+)(\.\d+)?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# S3's safe key characters and no wildcards (the prefix goes into IAM resource patterns)
_PREFIX = re.compile(r"^[A-Za-z0-9!_.()'-]+(/[A-Za-z0-9!_.()'-]+)*$")
_EKS_CLUSTER = re.compile(r"^[0-9A-Za-z][A-Za-z0-9_-]{0,99}$")
OLDEST_POSTGRES = 13  # the oldest major version RDS still runs in standard support


class SettingsError(ValueError):
    """An AWS deployment setting that cannot work; the message names the setting and what to do."""


@dataclass(frozen=True)
class AwsSettings:
    name: str  # prefix of every resource and the Pulumi stack's name
    region: str
    vpc_id: str
    private_subnet_ids: tuple[str, ...]  # two or more, in different zones: the RDS subnet group
    # The security group of the server's pods or nodes; the database accepts connections from it alone.
    # None: the program creates one in the VPC, to be attached to the server's pods or nodes.
    server_security_group_id: str | None = None
    # IRSA: the cluster's IAM OIDC provider. Without it the server role trusts EKS Pod Identity instead.
    eks_oidc_provider_arn: str | None = None
    eks_oidc_provider_url: str | None = None  # derived from the ARN when omitted
    eks_cluster_name: str | None = None  # with Pod Identity: also create the pod identity association
    kubernetes_namespace: str = "runyard"
    service_account: str = ""  # empty: the name
    db_instance_class: str = "db.t4g.medium"
    db_allocated_storage: int = 20  # GiB
    db_max_allocated_storage: int = 100  # GiB, the ceiling of storage autoscaling
    db_engine_version: str = "16"
    backup_retention_days: int = 14
    multi_az: bool = True
    performance_insights: bool = False  # not every instance class supports it
    iam_database_authentication: bool = False
    bucket_name: str | None = None  # None: "<name>-artifacts-" plus a random suffix (bucket names are global)
    artifacts_prefix: str = "artifacts"
    noncurrent_version_days: int = 90  # how long an overwritten or deleted artifact can still be restored
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Lists from YAML become tuples, so the value stays immutable; the service account defaults here
        # because a frozen dataclass cannot default one field from another.
        object.__setattr__(self, "private_subnet_ids", tuple(self.private_subnet_ids or ()))
        object.__setattr__(self, "tags", dict(self.tags or {}))
        if not self.service_account:
            object.__setattr__(self, "service_account", self.name)
        self._check_types()
        if not self.name or len(self.name) > NAME_MAX or not _NAME.fullmatch(self.name):
            raise SettingsError(f"name: {self.name!r} is not a valid name (lower-case letters, digits and "
                                f"single '-', starting with a letter, at most {NAME_MAX} characters), "
                                "e.g. runyard-prod.")
        if not _REGION.fullmatch(self.region or ""):
            raise SettingsError(f"region: {self.region!r} is not an AWS region, e.g. eu-west-1.")
        self._check_network()
        self._check_identity()
        self._check_database()
        self._check_bucket()
        self._check_tags()

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AwsSettings:
        """Settings from runyard.yaml's `aws:` section (keys are the field names); unknown keys are errors,
        because a misspelt key silently falling back to a default is how production gets single-AZ."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"aws: unknown setting(s) {', '.join(unknown)}; known: "
                                f"{', '.join(sorted(known))}.")
        missing = [key for key in ("name", "region", "vpc_id", "private_subnet_ids") if key not in data]
        if missing:
            raise SettingsError(f"aws: missing setting(s) {', '.join(missing)}.")
        return cls(**data)

    # ---- derived facts the program shares ----

    @property
    def irsa(self) -> bool:
        return self.eks_oidc_provider_arn is not None

    @property
    def oidc_issuer_host(self) -> str | None:
        """The provider's URL without https://, as IAM condition keys spell it."""
        if self.eks_oidc_provider_url is None:
            return None
        return self.eks_oidc_provider_url.removeprefix("https://").rstrip("/")

    @property
    def postgres_major(self) -> int:
        return int(_ENGINE_VERSION.fullmatch(self.db_engine_version)["major"])

    # ---- checks ----

    def _check_types(self) -> None:
        # YAML hands over whatever was written: "no" is a truthy string, "20" is not a number.
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise SettingsError(f"{item.name}: {value!r} is not a whole number.")
            if item.type == "bool" and not isinstance(value, bool):
                raise SettingsError(f"{item.name}: {value!r} is not true or false.")

    def _check_network(self) -> None:
        if not _VPC.fullmatch(self.vpc_id or ""):
            raise SettingsError(f"vpc_id: {self.vpc_id!r} is not a VPC id (vpc-…).")
        subnets = self.private_subnet_ids
        if len(subnets) < 2:
            raise SettingsError("private_subnet_ids: give at least two private subnets in different "
                                "availability zones; RDS needs them for its subnet group (and Multi-AZ "
                                "standby).")
        bad = [subnet for subnet in subnets if not _SUBNET.fullmatch(subnet or "")]
        if bad:
            raise SettingsError(f"private_subnet_ids: {bad[0]!r} is not a subnet id (subnet-…).")
        if len(set(subnets)) != len(subnets):
            raise SettingsError("private_subnet_ids: a subnet is listed twice.")
        group = self.server_security_group_id
        if group is not None and not _SECURITY_GROUP.fullmatch(group):
            raise SettingsError(f"server_security_group_id: {group!r} is not a security group id (sg-…).")

    def _check_identity(self) -> None:
        for value, setting in ((self.kubernetes_namespace, "kubernetes_namespace"),
                               (self.service_account, "service_account")):
            if not value or len(value) > 63 or not _DNS_LABEL.fullmatch(value):
                raise SettingsError(f"{setting}: {value!r} is not a Kubernetes name (lower-case letters, "
                                    "digits and '-', at most 63 characters).")
        if self.eks_oidc_provider_arn is None:
            if self.eks_oidc_provider_url is not None:
                raise SettingsError("eks_oidc_provider_url needs eks_oidc_provider_arn (the IAM OIDC "
                                    "provider of the cluster, arn:aws:iam::ACCOUNT:oidc-provider/…).")
        else:
            match = _OIDC_ARN.fullmatch(self.eks_oidc_provider_arn)
            if not match:
                raise SettingsError(f"eks_oidc_provider_arn: {self.eks_oidc_provider_arn!r} is not an IAM "
                                    "OIDC provider ARN (arn:aws:iam::ACCOUNT:oidc-provider/oidc.eks.…).")
            if self.eks_oidc_provider_url is None:
                object.__setattr__(self, "eks_oidc_provider_url", f"https://{match['host']}")
            elif self.oidc_issuer_host != match["host"]:
                raise SettingsError(f"eks_oidc_provider_url: {self.eks_oidc_provider_url!r} is not the "
                                    f"issuer of eks_oidc_provider_arn (https://{match['host']}).")
            if self.eks_cluster_name is not None:
                raise SettingsError("eks_cluster_name is for EKS Pod Identity; with eks_oidc_provider_arn "
                                    "(IRSA) leave it out.")
        if self.eks_cluster_name is not None and not _EKS_CLUSTER.fullmatch(self.eks_cluster_name):
            raise SettingsError(f"eks_cluster_name: {self.eks_cluster_name!r} is not an EKS cluster name.")

    def _check_database(self) -> None:
        if not _INSTANCE_CLASS.fullmatch(self.db_instance_class or ""):
            raise SettingsError(f"db_instance_class: {self.db_instance_class!r} is not an RDS instance "
                                "class, e.g. db.t4g.medium.")
        match = _ENGINE_VERSION.fullmatch(self.db_engine_version or "")
        if not match or int(match["major"]) < OLDEST_POSTGRES:
            raise SettingsError(f"db_engine_version: {self.db_engine_version!r} is not a PostgreSQL version "
                                f"RDS supports ({OLDEST_POSTGRES} or newer, e.g. 16 or 16.4).")
        if not 20 <= self.db_allocated_storage <= 65536:
            raise SettingsError("db_allocated_storage: between 20 and 65536 GiB (gp3).")
        if not self.db_allocated_storage <= self.db_max_allocated_storage <= 65536:
            raise SettingsError("db_max_allocated_storage: at least db_allocated_storage "
                                f"({self.db_allocated_storage}) and at most 65536 GiB.")
        if not 7 <= self.backup_retention_days <= 35:
            raise SettingsError(f"backup_retention_days: {self.backup_retention_days} is outside 7-35; a "
                                "production database keeps at least a week of point-in-time recovery "
                                "(RDS allows at most 35 days).")

    def _check_bucket(self) -> None:
        name = self.bucket_name
        if name is not None and (not _BUCKET.fullmatch(name) or ".." in name or name.startswith("xn--")):
            raise SettingsError(f"bucket_name: {name!r} is not an S3 bucket name (3-63 lower-case letters, "
                                "digits, '.' and '-').")
        if not _PREFIX.fullmatch(self.artifacts_prefix or "") or any(
                part in (".", "..") for part in self.artifacts_prefix.split("/")):
            raise SettingsError(f"artifacts_prefix: {self.artifacts_prefix!r} is not a key prefix (letters, "
                                "digits, '-', '_', '.', parts joined by '/', no leading or trailing '/', no "
                                "wildcards), e.g. artifacts.")
        if self.noncurrent_version_days < 1:
            raise SettingsError("noncurrent_version_days: at least 1 (days an overwritten or deleted "
                                "artifact version is kept).")

    def _check_tags(self) -> None:
        for key, value in self.tags.items():
            if not isinstance(key, str) or not 1 <= len(key) <= 128 or key.lower().startswith("aws:"):
                raise SettingsError(f"tags: {key!r} is not a tag key (1-128 characters, not starting with "
                                    "aws:).")
            if not isinstance(value, str) or len(value) > 256:
                raise SettingsError(f"tags: the value of {key!r} must be a string of at most 256 characters.")
