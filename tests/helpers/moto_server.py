"""A real moto server (AWS APIs over HTTP) for the APIs SeaweedFS lacks, and boto3 pointed at it through
the environment only. Test modules wrap these in fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import boto3


@contextmanager
def moto_server() -> Iterator[str]:
    """http://127.0.0.1:PORT of a moto server, on a port picked at run time, stopped afterwards."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_moto(monkeypatch, endpoint: str) -> None:
    """The AWS_* environment of a test: dummy credentials, us-east-1, Secrets Manager at `endpoint`
    (AWS_ENDPOINT_URL_SECRETS_MANAGER, which botocore reads itself), no profile files."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def secretsmanager(endpoint: str, region: str = "us-east-1"):
    """A Secrets Manager client of the test's own, to look behind the code under test."""
    return boto3.client("secretsmanager", region_name=region, endpoint_url=endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")
