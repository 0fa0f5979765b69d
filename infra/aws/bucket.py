"""The artifacts bucket: private, versioned, encrypted with our key, reachable over TLS only.

pulumi-aws 7 configures a bucket through separate resources (the inline arguments of s3.Bucket are
deprecated); each one below is one decision about the bucket.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws

from infra.aws.settings import AwsSettings

MULTIPART_ABORT_DAYS = 7  # an upload nobody completed in a week is a crashed client; its parts cost money


def artifacts_bucket(settings: AwsSettings, key: aws.kms.Key, tags: dict[str, str]) -> aws.s3.Bucket:
    name = f"{settings.name}-artifacts"
    bucket = aws.s3.Bucket(
        name,
        # None: Pulumi names it <name>-artifacts-<random suffix>, as bucket names are global.
        bucket=settings.bucket_name,
        force_destroy=False,  # `destroy` must never delete artifacts: a non-empty bucket stops it
        tags=tags,
    )
    child = pulumi.ResourceOptions(parent=bucket)

    # Before the policy: S3 refuses a bucket policy while the account's defaults are still being applied,
    # and the block makes sure nothing we or anyone adds later can make objects public.
    public_block = aws.s3.BucketPublicAccessBlock(
        name, bucket=bucket.id, block_public_acls=True, block_public_policy=True,
        ignore_public_acls=True, restrict_public_buckets=True, opts=child)
    # ACLs off: every object belongs to the bucket owner, access is decided by IAM and the policy alone.
    aws.s3.BucketOwnershipControls(
        name, bucket=bucket.id, rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)
    aws.s3.BucketServerSideEncryptionConfiguration(
        name, bucket=bucket.id,
        rules=[{
            "apply_server_side_encryption_by_default": {"sse_algorithm": "aws:kms",
                                                        "kms_master_key_id": key.arn},
            # One data key per bucket instead of one KMS call per object: far fewer KMS requests (cost,
            # throttling) for runs that log thousands of small files.
            "bucket_key_enabled": True,
        }],
        opts=child)
    # Versioning turns an overwrite or a delete into a recoverable event; the lifecycle rule bounds its cost.
    versioning = aws.s3.BucketVersioning(
        name, bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=child)
    aws.s3.BucketLifecycleConfiguration(
        name, bucket=bucket.id,
        rules=[{
            "id": "noncurrent-versions-and-stale-uploads",
            "status": "Enabled",
            "filter": {"prefix": ""},  # the whole bucket
            "noncurrent_version_expiration": {"noncurrent_days": settings.noncurrent_version_days},
            "abort_incomplete_multipart_upload": {"days_after_initiation": MULTIPART_ABORT_DAYS},
            # Once its old versions are gone a delete marker is clutter that slows listings: drop it.
            "expiration": {"expired_object_delete_marker": True},
        }],
        opts=pulumi.ResourceOptions(parent=bucket, depends_on=[versioning]))
    aws.s3.BucketPolicy(
        name, bucket=bucket.id, policy=bucket.arn.apply(lambda arn: json.dumps(tls_only_policy(arn))),
        opts=pulumi.ResourceOptions(parent=bucket, depends_on=[public_block]))
    return bucket


def tls_only_policy(bucket_arn: str) -> dict:
    """Deny every request that is not HTTPS with TLS 1.2 or newer, whoever sends it."""
    everything = [bucket_arn, f"{bucket_arn}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
             "Resource": everything, "Condition": {"Bool": {"aws:SecureTransport": "false"}}},
            {"Sid": "DenyOutdatedTls", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
             "Resource": everything, "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}}},
        ],
    }
