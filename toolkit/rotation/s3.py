"""`runyard rotate s3-keys`: a new IAM access key for the servers' S3 user, handed over without a restart.

Servers started with RUNYARD_S3_CREDENTIALS_FILE sign every S3 request with the key that file holds now
(server/artifacts/s3_keys.py). The secret given here is that file, or what feeds it (a Kubernetes Secret
mounted there, a Secrets Manager entry synced to it). IAM allows two keys per user, which is the overlap:

1. read the key in use from the secret; the user must not already hold a second key;
2. create a new key and write it to the secret (servers sign with it from their next request);
3. wait `grace_s`, so requests signed with the old key just before reach S3 first;
4. deactivate the old key, then check that every server's /ready (which writes, reads and deletes a
   probe object, now only possible with the new key) answers 200;
5. delete the old key.
Any failure before step 5 undoes the rotation: the old key is active again, the secret holds it again,
and the new key is deleted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import boto3
import requests
from botocore.exceptions import BotoCoreError, ClientError

from server.errors import RunyardError
from toolkit.db import SILENT, Progress
from toolkit.secrets import open_secret

READY_TIMEOUT_S = 30.0


def _fail(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_STATE")


def _current_key_id(value: str | None, ref: str) -> str:
    try:
        key_id = json.loads(value or "")["AccessKeyId"]
    except (ValueError, KeyError, TypeError):
        raise _fail(f"{ref} does not hold S3 keys as JSON with AccessKeyId and SecretAccessKey") from None
    return key_id


def _wait_ready(urls: Sequence[str], timeout_s: float = READY_TIMEOUT_S) -> None:
    for url in urls:
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while True:
            try:
                answer = requests.get(url.rstrip("/") + "/ready", timeout=10)
                if answer.status_code == 200:
                    break
                last = f"HTTP {answer.status_code}: {answer.text[:200]}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise _fail(f"{url} is not ready with the new key ({last})")
            time.sleep(0.5)


def rotate_s3_keys(user: str, secret: str, ready_urls: Sequence[str] = (), grace_s: float = 5.0,
                   progress: Progress = SILENT, iam=None) -> dict:
    """Rotates `user`'s access key as above; returns the key ids (never a secret key)."""
    iam = iam or boto3.client("iam")  # the operator's own AWS credentials, not the servers'
    store = open_secret(secret)
    old_value = store.read()
    old_id = _current_key_id(old_value, store.ref)
    progress.stage(f"Checking the access keys of IAM user {user}")
    try:
        keys = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    except (ClientError, BotoCoreError) as exc:
        raise _fail(f"Cannot list the access keys of IAM user {user}: {exc}") from None
    if [k["AccessKeyId"] for k in keys] != [old_id]:
        ids = ", ".join(k["AccessKeyId"] for k in keys) or "none"
        raise _fail(f"IAM user {user} must hold exactly the key in {store.ref} ({old_id}) to rotate it; it "
                    f"holds: {ids}. Delete a leftover key from an unfinished rotation first.")

    progress.stage("Creating a new access key and handing it to the servers")
    try:
        new = iam.create_access_key(UserName=user)["AccessKey"]
    except (ClientError, BotoCoreError) as exc:
        raise _fail(f"Cannot create an access key for IAM user {user}: {exc}") from None
    new_id, deactivated = new["AccessKeyId"], False
    try:
        store.write(json.dumps({"AccessKeyId": new_id, "SecretAccessKey": new["SecretAccessKey"]}))
        progress.stage(f"Waiting {grace_s:g} s for requests signed with the old key")
        time.sleep(grace_s)
        progress.stage(f"Deactivating the old key {old_id} and checking the servers")
        iam.update_access_key(UserName=user, AccessKeyId=old_id, Status="Inactive")
        deactivated = True
        _wait_ready(ready_urls)
    except Exception as exc:
        reason = exc.message if isinstance(exc, RunyardError) else f"{type(exc).__name__}: {exc}"
        _undo(iam, user, store, old_value, old_id, new_id, deactivated)
        raise _fail(f"Rotation of {user}'s S3 key failed and was undone (the old key {old_id} is active "
                    f"and back in {store.ref}): {reason}") from None
    progress.stage(f"Deleting the old key {old_id}")
    iam.delete_access_key(UserName=user, AccessKeyId=old_id)
    return {"user": user, "secret": store.ref, "old_key_id": old_id, "new_key_id": new_id,
            "servers_checked": list(ready_urls)}


def _undo(iam, user: str, store, old_value: str, old_id: str, new_id: str, deactivated: bool) -> None:
    if deactivated:
        iam.update_access_key(UserName=user, AccessKeyId=old_id, Status="Active")
    store.write(old_value)
    iam.delete_access_key(UserName=user, AccessKeyId=new_id)
