"""`rotate_s3_keys` against moto's IAM and S3 (SeaweedFS has no IAM; moto checks signatures and key
existence once INITIAL_NO_AUTH_ACTION_COUNT is used up) with two real `runyard server`s proxying
artifacts into that S3 under steady load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from botocore.exceptions import ClientError
from helpers.ports import free_port, wait_for
from helpers.servers import start_server

from server.errors import RunyardError
from toolkit.rotation.s3 import rotate_s3_keys

REGION = "us-east-1"
ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto server that enforces keys after its first 3 (bootstrap) calls; an admin IAM client."""
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _listening(port), timeout=30), "moto did not start"
    anonymous = boto3.client("iam", endpoint_url=url, region_name=REGION,
                             aws_access_key_id="AKIABOOTSTRAP0000000", aws_secret_access_key="bootstrap")
    anonymous.create_user(UserName="admin")
    anonymous.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=ALLOW_ALL)
    key = anonymous.create_access_key(UserName="admin")["AccessKey"]
    admin = {"endpoint_url": url, "region_name": REGION, "aws_access_key_id": key["AccessKeyId"],
             "aws_secret_access_key": key["SecretAccessKey"]}
    yield url, admin
    proc.terminate()
    proc.wait(10)
    log.close()


def _listening(port: int) -> bool:
    """A connection, not a request: moto counts requests against its unauthenticated allowance."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def deployment(aws, tmp_path):
    """An IAM user for the servers with one key in a 0600 secret file, a bucket, two servers."""
    url, admin = aws
    iam = boto3.client("iam", **admin)
    user, bucket = f"runyard-{uuid.uuid4().hex[:8]}", f"artifacts-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=ALLOW_ALL)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    secret = tmp_path / "s3-keys.json"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, json.dumps({"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]})
             .encode())
    os.close(fd)
    env = {"MLFLOW_S3_ENDPOINT_URL": url, "RUNYARD_S3_CREDENTIALS_FILE": str(secret),
           "AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    servers = [start_server(tmp_path / f"server{i}", None, "--artifacts-destination", f"s3://{bucket}/runs",
                            env=env) for i in range(2)]
    yield iam, user, key, secret, servers, url
    for server in servers:
        server.stop()


class Load:
    """Client threads uploading and reading back small artifacts through both servers, until stopped."""

    def __init__(self, servers, threads: int = 4):
        self.servers, self.failures, self.done = servers, [], 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, worker: int) -> None:
        session, n = requests.Session(), 0
        while not self._stop.is_set():
            server = self.servers[(worker + n) % len(self.servers)]
            path = f"{server.url}{ARTIFACTS}/load/{worker}/{n}.txt"
            body = f"{worker}-{n}".encode()
            try:
                put = session.put(path, data=body, timeout=30)
                got = session.get(path, timeout=30)
                if put.status_code != 200 or got.status_code != 200 or got.content != body:
                    self.failures.append(f"{put.status_code}/{got.status_code}: {put.text[:200]} "
                                         f"{got.text[:200]}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.done += 1
            n += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _keys(iam, user: str) -> list[str]:
    return [k["AccessKeyId"] for k in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]]


def test_rotation_under_load_fails_no_request_and_retires_the_old_key(deployment):
    iam, user, old, secret, servers, url = deployment
    with Load(servers) as load:
        assert wait_for(lambda: load.done >= 20, timeout=30)
        before = load.done
        report = rotate_s3_keys(user, str(secret), ready_urls=[s.url for s in servers], grace_s=1.0, iam=iam)
        assert wait_for(lambda: load.done >= before + 40, timeout=30)  # and well past the deletion
    assert load.failures == []
    new = json.loads(secret.read_text())
    assert report["old_key_id"] == old["AccessKeyId"] and report["new_key_id"] == new["AccessKeyId"]
    assert _keys(iam, user) == [new["AccessKeyId"]]
    assert new["SecretAccessKey"] not in json.dumps(report)
    stale = boto3.client("s3", endpoint_url=url, region_name=REGION, aws_access_key_id=old["AccessKeyId"],
                         aws_secret_access_key=old["SecretAccessKey"])
    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        stale.list_buckets()
    assert all("now signing with key" in s.log() for s in servers)
    assert not any(new["SecretAccessKey"] in s.log() or old["SecretAccessKey"] in s.log() for s in servers)


def test_a_server_that_does_not_come_ready_undoes_the_rotation(deployment):
    iam, user, old, secret, servers, _ = deployment
    before = secret.read_text()
    nowhere = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RunyardError, match="undone") as failure:
        rotate_s3_keys(user, str(secret), ready_urls=[servers[0].url, nowhere], grace_s=0.2, iam=iam)
    assert old["SecretAccessKey"] not in failure.value.message
    assert secret.read_text() == before
    assert _keys(iam, user) == [old["AccessKeyId"]]
    [meta] = iam.list_access_keys(UserName=user)["AccessKeyMetadata"]
    assert meta["Status"] == "Active"
    answer = requests.put(f"{servers[1].url}{ARTIFACTS}/after-undo.txt", data=b"still fine", timeout=30)
    assert answer.status_code == 200, answer.text


def test_a_leftover_second_key_is_refused_before_anything_changes(deployment):
    iam, user, old, secret, _, _ = deployment
    leftover = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    with pytest.raises(RunyardError, match="Delete a leftover key"):
        rotate_s3_keys(user, str(secret), grace_s=0, iam=iam)
    assert sorted(_keys(iam, user)) == sorted([old["AccessKeyId"], leftover])
    assert json.loads(Path(secret).read_text())["AccessKeyId"] == old["AccessKeyId"]
