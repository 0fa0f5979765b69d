"""The Pulumi program of `runyard deploy aws`: a key, a bucket, a database and the server's identity.

`build(settings)` creates the resources, exports the stack outputs and returns them; toolkit/deploy/aws.py
runs it through the Automation API, the tests under Pulumi's mocks. The outputs are what `runyard deploy
kubernetes` needs: URIs without secrets, the ARN of the secret that holds the password, the role ARN.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

from infra.aws import bucket as buckets
from infra.aws import database, iam
from infra.aws.settings import AwsSettings

KEY_DELETION_WINDOW_DAYS = 30  # the longest AWS allows: a key deleted by mistake takes the data with it


def build(settings: AwsSettings) -> dict[str, pulumi.Input[str]]:
    tags = {"app": "runyard", "runyard:name": settings.name, **settings.tags}
    # One customer-managed key for the bucket, the database and its password secret: one place to audit
    # and to revoke. The default key policy (the account decides through IAM) is kept on purpose.
    key = aws.kms.Key(
        f"{settings.name}-data",
        description=f"runyard {settings.name}: artifacts, database, database password",
        enable_key_rotation=True, deletion_window_in_days=KEY_DELETION_WINDOW_DAYS, tags=tags)
    aws.kms.Alias(f"{settings.name}-data", name=f"alias/{settings.name}-data", target_key_id=key.key_id,
                  opts=pulumi.ResourceOptions(parent=key))

    bucket = buckets.artifacts_bucket(settings, key, tags)
    server_group = database.server_security_group(settings, tags)
    database_group = database.database_security_group(settings, server_group, tags)
    instance = database.postgres(settings, key, database_group, tags)
    secret_arn = database.master_secret_arn(instance)
    role = iam.server_role(settings, bucket, key, secret_arn, tags)

    outputs: dict[str, pulumi.Input[str]] = {
        "region": settings.region,
        "bucket_name": bucket.bucket,
        "artifacts_destination": bucket.bucket.apply(lambda name: f"s3://{name}/{settings.artifacts_prefix}"),
        # No password: the server reads it from the secret below (synced into Kubernetes by the operator).
        "backend_store_uri": instance.address.apply(
            lambda host: f"postgresql://{database.USERNAME}@{host}:{database.PORT}/{database.DB_NAME}"
                         "?sslmode=require"),
        "db_password_secret_arn": secret_arn,
        "kms_key_arn": key.arn,
        "server_role_arn": role.arn,
        "server_role_trust": "irsa" if settings.irsa else "eks-pod-identity",
        "server_security_group_id": server_group,
        "database_security_group_id": database_group.id,
        "kubernetes_namespace": settings.kubernetes_namespace,
        "kubernetes_service_account": settings.service_account,
    }
    for name, value in outputs.items():
        pulumi.export(name, value)
    return outputs
