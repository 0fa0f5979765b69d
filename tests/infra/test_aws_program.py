"""The Pulumi program of `runyard deploy aws` under Pulumi's mocks: the real SDK and pulumi-aws resource
classes, an engine that records every resource and answers like AWS would. No CLI, no cloud.

Each test deploys the program once into a fresh recorder and asserts on what reached the engine (the
inputs, as the engine sees them: camelCase keys, numbers as floats) and on the stack outputs.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from typing import Any

import pulumi
import pytest


@dataclass
class Registered:
    type: str
    name: str
    inputs: dict
    id: str
    outputs: dict


class Recorder(pulumi.runtime.Mocks):
    """Records every resource; returns ids and computed attributes shaped like AWS's."""

    ACCOUNT = "123456789012"

    def __init__(self) -> None:
        self.resources: list[Registered] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        inputs, name = args.inputs, args.name
        digest = hashlib.sha1(f"{args.typ}/{name}".encode()).hexdigest()
        region = "eu-west-1"
        computed: dict[str, Any] = {"arn": f"arn:aws:{args.typ.split(':')[1].split('/')[0]}:{region}:"
                                           f"{self.ACCOUNT}:{name}"}
        ident = f"{name}-{digest[:8]}"
        if args.typ == "aws:s3/bucket:Bucket":
            ident = inputs.get("bucket") or f"{name}-{digest[:7]}"
            computed = {"bucket": ident, "arn": f"arn:aws:s3:::{ident}"}
        elif args.typ == "aws:kms/key:Key":
            ident = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
            computed = {"keyId": ident, "arn": f"arn:aws:kms:{region}:{self.ACCOUNT}:key/{ident}"}
        elif args.typ == "aws:ec2/securityGroup:SecurityGroup":
            ident = f"sg-{digest[:17]}"
        elif args.typ == "aws:iam/role:Role":
            computed = {"arn": f"arn:aws:iam::{self.ACCOUNT}:role/{name}-{digest[:7]}"}
        elif args.typ in ("aws:rds/subnetGroup:SubnetGroup", "aws:rds/parameterGroup:ParameterGroup"):
            computed["name"] = f"{name}-{digest[:7]}"
        elif args.typ == "aws:rds/instance:Instance":
            address = f"{inputs['identifier']}.c{digest[:11]}.{region}.rds.amazonaws.com"
            computed = {
                "address": address, "endpoint": f"{address}:5432",
                "arn": f"arn:aws:rds:{region}:{self.ACCOUNT}:db:{inputs['identifier']}",
                # RDS creates the secret itself, named rds!db-<uuid>
                "masterUserSecrets": [{
                    "secretArn": f"arn:aws:secretsmanager:{region}:{self.ACCOUNT}:"
                                 f"secret:rds!db-{digest[:8]}-AbCdEf",
                    "kmsKeyId": inputs.get("masterUserSecretKmsKeyId"), "secretStatus": "active"}],
            }
        outputs = {**inputs, **computed}
        self.resources.append(Registered(args.typ, name, inputs, ident, outputs))
        return [ident, outputs]

    def call(self, args: pulumi.runtime.MockCallArgs):
        raise AssertionError(f"the program made an unexpected provider call: {args.token}")

    # ---- lookups for the tests ----

    def all(self, type_token: str) -> list[Registered]:
        return [item for item in self.resources if item.type == type_token]

    def one(self, type_token: str) -> Registered:
        found = self.all(type_token)
        assert len(found) == 1, f"{type_token}: {len(found)} registered"
        return found[0]


# Appendix H: the mocks are in place before the program (and pulumi_aws) is imported.
pulumi.runtime.set_mocks(Recorder(), preview=False)

from infra.aws import iam, program  # noqa: E402
from infra.aws.settings import AwsSettings, SettingsError  # noqa: E402

# pulumi_aws warns about its own deprecated classes while its modules load (whichever test imports them
# first); test_the_program_uses_no_deprecated_api checks what the program itself uses.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pulumi_aws")

BUCKET = "aws:s3/bucket:Bucket"
KEY = "aws:kms/key:Key"
INSTANCE = "aws:rds/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
ROLE = "aws:iam/role:Role"
OIDC_HOST = "oidc.eks.eu-west-1.amazonaws.com/id/0123456789ABCDEF0123456789ABCDEF"
SETTINGS = AwsSettings(
    name="runyard-prod", region="eu-west-1", vpc_id="vpc-0123456789abcdef0",
    private_subnet_ids=("subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"),
    eks_oidc_provider_arn=f"arn:aws:iam::123456789012:oidc-provider/{OIDC_HOST}",
    tags={"team": "ml-platform"})


@pytest.fixture
def recorder() -> Recorder:
    """A fresh engine for each test: nothing registered by another test can satisfy an assertion here."""
    mocks = Recorder()
    pulumi.runtime.set_mocks(mocks, preview=False)
    return mocks


def deploy(settings: AwsSettings = SETTINGS) -> dict[str, Any]:
    """Runs the program to completion under the mocks; returns the resolved stack outputs."""
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def run():
        # The decorator waits for this Output and for every registration the program started.
        return pulumi.Output.all(**program.build(settings)).apply(resolved.update)

    run()
    return resolved


def walk(value: Any, path: str = ""):
    """Every (path, key, leaf) in nested inputs, so a property hidden in a nested block is seen too."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from ((p, k, v) for p, k, v in walk(item, f"{path}.{key}"))
            yield path, key, item
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


# ---- the key ------------------------------------------------------------------------------------------

def test_one_rotating_key_with_an_alias(recorder):
    deploy()
    key = recorder.one(KEY)
    assert key.inputs["enableKeyRotation"] is True
    assert key.inputs["deletionWindowInDays"] == 30
    alias = recorder.one("aws:kms/alias:Alias")
    assert alias.inputs == {"name": "alias/runyard-prod-data", "targetKeyId": key.id}


# ---- the bucket ---------------------------------------------------------------------------------------

def test_bucket_is_encrypted_with_our_key(recorder):
    deploy()
    key, bucket = recorder.one(KEY), recorder.one(BUCKET)
    sse = recorder.one("aws:s3/bucketServerSideEncryptionConfiguration:"
                       "BucketServerSideEncryptionConfiguration")
    assert sse.inputs["bucket"] == bucket.id
    [rule] = sse.inputs["rules"]
    assert rule["applyServerSideEncryptionByDefault"] == {"sseAlgorithm": "aws:kms",
                                                          "kmsMasterKeyId": key.outputs["arn"]}
    assert rule["bucketKeyEnabled"] is True
    assert bucket.inputs.get("forceDestroy") is False


def test_bucket_blocks_public_access_and_acls(recorder):
    deploy()
    bucket = recorder.one(BUCKET)
    block = recorder.one("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
    assert block.inputs == {"bucket": bucket.id, "blockPublicAcls": True, "blockPublicPolicy": True,
                            "ignorePublicAcls": True, "restrictPublicBuckets": True}
    ownership = recorder.one("aws:s3/bucketOwnershipControls:BucketOwnershipControls")
    assert ownership.inputs["rule"] == {"objectOwnership": "BucketOwnerEnforced"}


def test_bucket_policy_refuses_anything_but_tls(recorder):
    deploy()
    bucket = recorder.one(BUCKET)
    policy = recorder.one("aws:s3/bucketPolicy:BucketPolicy")
    assert policy.inputs["bucket"] == bucket.id
    statements = json.loads(policy.inputs["policy"])["Statement"]
    arn = bucket.outputs["arn"]
    insecure = [s for s in statements if s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport")]
    assert len(insecure) == 1
    [deny] = insecure
    assert deny["Effect"] == "Deny" and deny["Principal"] == "*" and deny["Action"] == "s3:*"
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert sorted(deny["Resource"]) == sorted([arn, f"{arn}/*"])
    assert all(s["Effect"] == "Deny" for s in statements), "the bucket policy only ever takes away"


def test_bucket_is_versioned_and_old_versions_expire(recorder):
    deploy(replace(SETTINGS, noncurrent_version_days=45))
    bucket = recorder.one(BUCKET)
    versioning = recorder.one("aws:s3/bucketVersioning:BucketVersioning")
    assert versioning.inputs == {"bucket": bucket.id, "versioningConfiguration": {"status": "Enabled"}}
    lifecycle = recorder.one("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
    assert lifecycle.inputs["bucket"] == bucket.id
    [rule] = lifecycle.inputs["rules"]
    assert rule["status"] == "Enabled"
    assert rule["filter"] == {"prefix": ""}
    assert rule["noncurrentVersionExpiration"] == {"noncurrentDays": 45}
    assert rule["abortIncompleteMultipartUpload"] == {"daysAfterInitiation": 7}


# ---- the database -------------------------------------------------------------------------------------

def test_database_is_private_encrypted_and_hard_to_lose(recorder):
    deploy()
    db = recorder.one(INSTANCE).inputs
    key = recorder.one(KEY)
    assert db["engine"] == "postgres" and db["engineVersion"] == "16"
    assert db["storageEncrypted"] is True and db["kmsKeyId"] == key.outputs["arn"]
    assert db["publiclyAccessible"] is False
    assert db["deletionProtection"] is True
    assert db["skipFinalSnapshot"] is False and db["finalSnapshotIdentifier"] == "runyard-prod-postgres-final"
    assert db["backupRetentionPeriod"] == 14 >= 7
    assert db["copyTagsToSnapshot"] is True and db["autoMinorVersionUpgrade"] is True
    assert db["multiAz"] is True
    assert db["username"] == "runyard" and db["dbName"] == "runyard"
    assert db["instanceClass"] == "db.t4g.medium" and db["allocatedStorage"] == 20
    assert db["maxAllocatedStorage"] == 100


def test_password_is_generated_by_rds_and_never_passes_through_pulumi(recorder):
    deploy()
    db = recorder.one(INSTANCE).inputs
    assert db["manageMasterUserPassword"] is True
    assert db["masterUserSecretKmsKeyId"] == recorder.one(KEY).outputs["arn"]
    for item in recorder.resources:
        keys = {key for _, key, _ in walk(item.inputs)}
        assert not keys & {"password", "passwordWo", "passwordWoVersion"}, f"{item.type} {item.name}"
    assert not recorder.all("aws:secretsmanager/secretVersion:SecretVersion")
    assert not recorder.all("random:index/randomPassword:RandomPassword")


def test_database_lives_in_the_private_subnets_and_forces_tls(recorder):
    deploy(replace(SETTINGS, db_engine_version="15.7"))
    db = recorder.one(INSTANCE)
    subnets = recorder.one("aws:rds/subnetGroup:SubnetGroup")
    assert subnets.inputs["subnetIds"] == list(SETTINGS.private_subnet_ids)
    assert db.inputs["dbSubnetGroupName"] == subnets.outputs["name"]
    group = recorder.one("aws:rds/parameterGroup:ParameterGroup")
    assert group.inputs["family"] == "postgres15"
    assert db.inputs["parameterGroupName"] == group.outputs["name"]
    parameters = {item["name"]: item["value"] for item in group.inputs["parameters"]}
    assert parameters["rds.force_ssl"] == "1"
    assert parameters["log_connections"] == "1" and "log_min_duration_statement" in parameters


def test_optional_database_features(recorder):
    deploy(replace(SETTINGS, multi_az=False, performance_insights=True, iam_database_authentication=True,
                   backup_retention_days=30))
    db = recorder.one(INSTANCE).inputs
    assert db["multiAz"] is False
    assert db["performanceInsightsEnabled"] is True
    assert db["performanceInsightsKmsKeyId"] == recorder.one(KEY).outputs["arn"]
    assert db["iamDatabaseAuthenticationEnabled"] is True
    assert db["backupRetentionPeriod"] == 30


# ---- the network --------------------------------------------------------------------------------------

def _groups(recorder: Recorder) -> dict[str, Registered]:
    return {item.name.removeprefix("runyard-prod-"): item for item in recorder.all(SECURITY_GROUP)}


def test_database_accepts_only_the_created_server_group(recorder):
    deploy()
    groups = _groups(recorder)
    assert set(groups) == {"server", "database"}
    database, server = groups["database"], groups["server"]
    assert database.inputs["vpcId"] == server.inputs["vpcId"] == SETTINGS.vpc_id
    assert "ingress" not in database.inputs and "egress" not in database.inputs  # no inline rules
    [rule] = recorder.all(INGRESS_RULE)
    assert rule.inputs["securityGroupId"] == database.id
    assert rule.inputs["referencedSecurityGroupId"] == server.id
    assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 5432, 5432)
    assert not {key for key in rule.inputs if "cidr" in key.lower() or "prefixList" in key}
    assert recorder.one(INSTANCE).inputs["vpcSecurityGroupIds"] == [database.id]


def test_database_accepts_only_a_given_server_group(recorder):
    outputs = deploy(replace(SETTINGS, server_security_group_id="sg-0123456789abcdef0"))
    assert set(_groups(recorder)) == {"database"}
    [rule] = recorder.all(INGRESS_RULE)
    assert rule.inputs["referencedSecurityGroupId"] == "sg-0123456789abcdef0"
    assert outputs["server_security_group_id"] == "sg-0123456789abcdef0"


def test_no_address_range_is_open_anywhere_in_the_stack(recorder):
    deploy()
    for item in recorder.resources:
        for path, key, value in walk(item.inputs):
            assert value not in ("0.0.0.0/0", "::/0"), f"{item.type} {item.name} {path}.{key}"
            if "ecurityGroup" in item.type:
                assert "cidr" not in key.lower(), f"{item.type} {item.name} {path}.{key}"
    rules = [item for item in recorder.resources if "ecurityGroup" in item.type and "Rule" in item.type]
    assert rules and all(rule.type == INGRESS_RULE for rule in rules)


# ---- the server's identity ----------------------------------------------------------------------------

def test_server_policy_is_least_privilege(recorder):
    outputs = deploy(replace(SETTINGS, artifacts_prefix="mlflow/artifacts"))
    bucket_arn = recorder.one(BUCKET).outputs["arn"]
    role = recorder.one(ROLE)
    policy = recorder.one(ROLE_POLICY)
    assert policy.inputs["role"] == role.id
    statements = json.loads(policy.inputs["policy"])["Statement"]
    assert all(s["Effect"] == "Allow" for s in statements)
    by_action = {action: s for s in statements for action in s["Action"]}
    for action, statement in by_action.items():
        assert "*" not in action, action
        assert "*" not in statement["Resource"], action
    assert set(by_action) == {"s3:ListBucket", *iam.OBJECT_ACTIONS, *iam.KEY_ACTIONS,
                              "secretsmanager:GetSecretValue"}
    listing = by_action["s3:ListBucket"]
    assert listing["Resource"] == [bucket_arn]
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["mlflow/artifacts", "mlflow/artifacts/*"]}}
    for action in iam.OBJECT_ACTIONS:
        assert by_action[action]["Resource"] == [f"{bucket_arn}/mlflow/artifacts/*"], action
    for action in iam.KEY_ACTIONS:
        assert by_action[action]["Resource"] == [recorder.one(KEY).outputs["arn"]]
    assert by_action["secretsmanager:GetSecretValue"]["Resource"] == [outputs["db_password_secret_arn"]]


def test_irsa_trusts_exactly_one_service_account(recorder):
    deploy(replace(SETTINGS, kubernetes_namespace="mlops", service_account="tracking"))
    trust = json.loads(recorder.one(ROLE).inputs["assumeRolePolicy"])
    assert trust["Statement"] == [{
        "Effect": "Allow",
        "Principal": {"Federated": SETTINGS.eks_oidc_provider_arn},
        "Action": "sts:AssumeRoleWithWebIdentity",
        "Condition": {"StringEquals": {f"{OIDC_HOST}:sub": "system:serviceaccount:mlops:tracking",
                                       f"{OIDC_HOST}:aud": "sts.amazonaws.com"}},
    }]
    assert not recorder.all("aws:eks/podIdentityAssociation:PodIdentityAssociation")


def test_without_oidc_the_role_trusts_pod_identity(recorder):
    outputs = deploy(replace(SETTINGS, eks_oidc_provider_arn=None, eks_oidc_provider_url=None,
                             eks_cluster_name="platform"))
    role = recorder.one(ROLE)
    trust = json.loads(role.inputs["assumeRolePolicy"])
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
                                   "Action": ["sts:AssumeRole", "sts:TagSession"]}]
    association = recorder.one("aws:eks/podIdentityAssociation:PodIdentityAssociation")
    assert association.inputs["clusterName"] == "platform"
    assert association.inputs["namespace"] == "runyard"
    assert association.inputs["serviceAccount"] == "runyard-prod"
    assert association.inputs["roleArn"] == role.outputs["arn"]
    assert outputs["server_role_trust"] == "eks-pod-identity"


# ---- outputs and tags ---------------------------------------------------------------------------------

def test_outputs_feed_the_kubernetes_deployment(recorder):
    outputs = deploy()
    bucket, db, key = recorder.one(BUCKET), recorder.one(INSTANCE), recorder.one(KEY)
    address = db.outputs["address"]
    assert outputs["backend_store_uri"] == f"postgresql://runyard@{address}:5432/runyard?sslmode=require"
    assert outputs["artifacts_destination"] == f"s3://{bucket.outputs['bucket']}/artifacts"
    assert outputs["bucket_name"] == bucket.outputs["bucket"]
    assert outputs["db_password_secret_arn"] == db.outputs["masterUserSecrets"][0]["secretArn"]
    assert outputs["server_role_arn"] == recorder.one(ROLE).outputs["arn"]
    assert outputs["server_security_group_id"] == _groups(recorder)["server"].id
    assert outputs["kms_key_arn"] == key.outputs["arn"]
    assert outputs["region"] == "eu-west-1"
    assert outputs["server_role_trust"] == "irsa"
    assert outputs["kubernetes_namespace"] == "runyard"
    assert outputs["kubernetes_service_account"] == "runyard-prod"
    for value in outputs.values():
        assert "password" not in str(value).lower() and ":@" not in str(value)


def test_outputs_are_exported_and_checked_inside_the_run(recorder):
    # The canonical shape of appendix H: the assertion runs inside apply and must fail the test if false.
    @pulumi.runtime.test
    def run():
        outputs = program.build(SETTINGS)

        def check(values):
            uri, destination = values
            assert uri.startswith("postgresql://runyard@runyard-prod-postgres.") and "sslmode=require" in uri
            assert destination.startswith("s3://runyard-prod-artifacts-")
            assert destination.endswith("/artifacts")

        return pulumi.Output.all(outputs["backend_store_uri"], outputs["artifacts_destination"]).apply(check)

    run()


def test_a_false_assertion_inside_the_run_fails(recorder):
    # Proof the harness waits on the Output: an assertion that cannot hold must surface here.
    @pulumi.runtime.test
    def run():
        def check(uri):
            assert "sslmode=disable" in uri

        return program.build(SETTINGS)["backend_store_uri"].apply(check)

    with pytest.raises(AssertionError):
        run()


def test_every_taggable_resource_is_tagged(recorder):
    deploy()
    taggable = [item for item in recorder.resources if item.type in (
        BUCKET, KEY, INSTANCE, SECURITY_GROUP, ROLE, "aws:rds/subnetGroup:SubnetGroup",
        "aws:rds/parameterGroup:ParameterGroup")]
    assert len(taggable) == 8
    for item in taggable:
        assert item.inputs["tags"] == {"app": "runyard", "runyard:name": "runyard-prod",
                                       "team": "ml-platform"}


def test_a_fixed_bucket_name_is_used_as_given(recorder):
    outputs = deploy(replace(SETTINGS, bucket_name="acme-runyard-artifacts"))
    assert recorder.one(BUCKET).inputs["bucket"] == "acme-runyard-artifacts"
    assert outputs["artifacts_destination"] == "s3://acme-runyard-artifacts/artifacts"


def test_the_program_uses_no_deprecated_api(recorder, caplog):
    deploy()  # loads every pulumi_aws module the program touches
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deploy()
    assert [str(item.message) for item in caught if issubclass(item.category, DeprecationWarning)] == []
    # pulumi_aws reports a deprecated resource or argument to the engine, which the mocks log here.
    assert [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()] == []


# ---- settings -----------------------------------------------------------------------------------------

BASE = {"name": "runyard-prod", "region": "eu-west-1", "vpc_id": "vpc-0123456789abcdef0",
        "private_subnet_ids": ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"]}


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "Runyard"}, "name: 'Runyard' is not a valid name"),
    ({"name": "runyard--prod"}, "name:"),
    ({"name": "runyard-"}, "name:"),
    ({"name": "r" * 41}, "at most 40 characters"),
    ({"region": "europe"}, "region: 'europe' is not an AWS region"),
    ({"vpc_id": "vpc-xyz"}, "vpc_id:"),
    ({"private_subnet_ids": ["subnet-0aaaaaaaaaaaaaaa1"]}, "private_subnet_ids: give at least two"),
    ({"private_subnet_ids": ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa1"]}, "listed twice"),
    ({"private_subnet_ids": ["subnet-0aaaaaaaaaaaaaaa1", "sg-0123456789abcdef0"]}, "is not a subnet id"),
    ({"server_security_group_id": "default"}, "server_security_group_id:"),
    ({"backup_retention_days": 0}, "backup_retention_days: 0 is outside 7-35"),
    ({"backup_retention_days": 3}, "at least a week"),
    ({"backup_retention_days": 36}, "backup_retention_days:"),
    ({"backup_retention_days": "14"}, "backup_retention_days: '14' is not a whole number"),
    ({"multi_az": "no"}, "multi_az: 'no' is not true or false"),
    ({"db_engine_version": "9.6"}, "db_engine_version:"),
    ({"db_engine_version": "latest"}, "db_engine_version:"),
    ({"db_instance_class": "t4g.medium"}, "db_instance_class:"),
    ({"db_allocated_storage": 10}, "db_allocated_storage:"),
    ({"db_allocated_storage": 200}, "db_max_allocated_storage: at least db_allocated_storage (200)"),
    ({"noncurrent_version_days": 0}, "noncurrent_version_days:"),
    ({"artifacts_prefix": "/artifacts"}, "artifacts_prefix:"),
    ({"artifacts_prefix": "artifacts/*"}, "artifacts_prefix:"),
    ({"artifacts_prefix": "a/../b"}, "artifacts_prefix:"),
    ({"artifacts_prefix": ""}, "artifacts_prefix:"),
    ({"bucket_name": "Artifacts_Bucket"}, "bucket_name:"),
    ({"kubernetes_namespace": "ML"}, "kubernetes_namespace:"),
    ({"service_account": "a_b"}, "service_account:"),
    ({"eks_oidc_provider_arn": "arn:aws:iam::123:oidc-provider/x"}, "eks_oidc_provider_arn:"),
    ({"eks_oidc_provider_url": "https://oidc.example"}, "eks_oidc_provider_url needs eks_oidc_provider_arn"),
    ({"eks_oidc_provider_arn": f"arn:aws:iam::123456789012:oidc-provider/{OIDC_HOST}",
      "eks_oidc_provider_url": "https://oidc.eks.eu-west-1.amazonaws.com/id/OTHER"}, "is not the issuer"),
    ({"eks_oidc_provider_arn": f"arn:aws:iam::123456789012:oidc-provider/{OIDC_HOST}",
      "eks_cluster_name": "platform"}, "eks_cluster_name is for EKS Pod Identity"),
    ({"tags": {"aws:owner": "x"}}, "tags: 'aws:owner'"),
    ({"tags": {"cost": 3}}, "tags: the value of 'cost'"),
])
def test_settings_refuse_what_cannot_work(change, message):
    with pytest.raises(SettingsError) as caught:
        AwsSettings(**{**BASE, **change})
    assert message in str(caught.value)


def test_settings_defaults_and_derived_values():
    settings = AwsSettings.from_mapping({**BASE, "eks_oidc_provider_arn":
                                         f"arn:aws:iam::123456789012:oidc-provider/{OIDC_HOST}"})
    assert settings.private_subnet_ids == tuple(BASE["private_subnet_ids"])
    assert settings.service_account == "runyard-prod" and settings.kubernetes_namespace == "runyard"
    assert settings.eks_oidc_provider_url == f"https://{OIDC_HOST}" and settings.oidc_issuer_host == OIDC_HOST
    assert (settings.multi_az, settings.backup_retention_days, settings.postgres_major) == (True, 14, 16)
    assert settings.irsa


def test_settings_from_yaml_refuse_unknown_and_missing_keys():
    with pytest.raises(SettingsError, match="unknown setting.*multiaz"):
        AwsSettings.from_mapping({**BASE, "multiaz": False})
    with pytest.raises(SettingsError, match="missing setting.*vpc_id"):
        AwsSettings.from_mapping({key: value for key, value in BASE.items() if key != "vpc_id"})
