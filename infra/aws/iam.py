"""The server's AWS identity: one role with exactly what runyard does, nothing with a wildcard action.

Who may take the role:
- IRSA, when the cluster's OIDC provider is given: only the runyard service account of the runyard
  namespace, through a web identity token meant for STS.
- EKS Pod Identity otherwise. Not ec2.amazonaws.com: on EKS the nodes already carry their own instance
  profile, so an EC2-trusted role could only be used by granting it to every pod on the node. Pod Identity
  needs no OIDC provider; the association (created here when eks_cluster_name is given) names the cluster,
  namespace and service account that receive the role.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from infra.aws.settings import AwsSettings

OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                  "s3:ListMultipartUploadParts"]
KEY_ACTIONS = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"]


def server_policy(*, bucket_arn: str, prefix: str, key_arn: str, secret_arn: str, region: str) -> dict:
    return {
        "Version": "2012-10-17",
        "Statement": [
            # Listing is a bucket-level action: the prefix condition keeps it inside the artifacts prefix.
            {"Sid": "ListArtifacts", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [bucket_arn],
             "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}},
            {"Sid": "ReadWriteArtifacts", "Effect": "Allow", "Action": OBJECT_ACTIONS,
             "Resource": [f"{bucket_arn}/{prefix}/*"]},
            # The key only through S3 (objects) and Secrets Manager (the database password), never directly.
            {"Sid": "UseTheKeyThroughS3AndSecretsManager", "Effect": "Allow", "Action": KEY_ACTIONS,
             "Resource": [key_arn],
             "Condition": {"StringEquals": {"kms:ViaService": [f"s3.{region}.amazonaws.com",
                                                               f"secretsmanager.{region}.amazonaws.com"]}}},
            {"Sid": "ReadTheDatabasePassword", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
             "Resource": [secret_arn]},
        ],
    }


def irsa_trust(*, provider_arn: str, issuer_host: str, namespace: str, service_account: str) -> dict:
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": {"Federated": provider_arn},
            "Action": "sts:AssumeRoleWithWebIdentity",
            "Condition": {"StringEquals": {
                f"{issuer_host}:sub": f"system:serviceaccount:{namespace}:{service_account}",
                f"{issuer_host}:aud": "sts.amazonaws.com",
            }},
        }],
    }


def pod_identity_trust() -> dict:
    # TagSession: Pod Identity tags each session with the cluster, namespace and service account.
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "pods.eks.amazonaws.com"},
                       "Action": ["sts:AssumeRole", "sts:TagSession"]}],
    }


def server_role(settings: AwsSettings, bucket: aws.s3.Bucket, key: aws.kms.Key,
                secret_arn: pulumi.Output[str], tags: dict[str, str]) -> aws.iam.Role:
    if settings.irsa:
        trust = irsa_trust(provider_arn=settings.eks_oidc_provider_arn, issuer_host=settings.oidc_issuer_host,
                           namespace=settings.kubernetes_namespace, service_account=settings.service_account)
    else:
        trust = pod_identity_trust()
    role = aws.iam.Role(
        f"{settings.name}-server", assume_role_policy=json.dumps(trust), tags=tags,
        description=f"runyard server {settings.name}: its artifacts, its key, its database password")
    policy = pulumi.Output.all(bucket.arn, key.arn, secret_arn).apply(
        lambda arns: json.dumps(server_policy(bucket_arn=arns[0], prefix=settings.artifacts_prefix,
                                              key_arn=arns[1], secret_arn=arns[2], region=settings.region)))
    # Inline: the permissions live and die with the role, nobody can attach them elsewhere.
    aws.iam.RolePolicy(f"{settings.name}-server", role=role.id, policy=policy,
                       opts=pulumi.ResourceOptions(parent=role))
    if not settings.irsa and settings.eks_cluster_name is not None:
        aws.eks.PodIdentityAssociation(
            f"{settings.name}-server", cluster_name=settings.eks_cluster_name,
            namespace=settings.kubernetes_namespace, service_account=settings.service_account,
            role_arn=role.arn, tags=tags, opts=pulumi.ResourceOptions(parent=role))
    return role
