"""What only the S3 store does, against a real SeaweedFS server (tests/helpers/stores/s3.py): upload extra
arguments, multipart writes, the multipart-upload and presigned-download capabilities, the errors of a
missing bucket or a dead endpoint, and a `runyard server` process proxying to S3 (stock client included).

The conformance suite (test_artifact_stores.py) covers what every store does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from helpers import databases
from helpers.ports import free_port
from helpers.stores import s3 as s3_store

from server.artifacts import repository_for
from server.artifacts.base import UploadedPart
from server.artifacts.s3 import PART_SIZE
from server.errors import RunyardError

MIB = 2**20
ARTIFACTS = "/api/2.0/mlflow-artifacts"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        with s3_store.running(tmp_path_factory.mktemp("s3")) as started:
            yield started
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def s3(store):
    """The test's own boto3 client, to look at the bucket behind the store's back."""
    return s3_store.client(store)


@pytest.fixture
def env(store, monkeypatch):
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_S3_UPLOAD_EXTRA_ARGS", raising=False)
    return monkeypatch


@pytest.fixture
def open_repo(store, env):
    """factory() -> a store on a fresh, empty root; opened when called, after the test set its env."""
    opened = []

    def factory():
        repository = repository_for(store.root(uuid.uuid4().hex[:12]))
        opened.append(repository)
        return repository

    yield factory
    for repository in opened:
        asyncio.run(repository.aclose())


@pytest.fixture
def repo(open_repo):
    return open_repo()


def run(coroutine):
    return asyncio.run(coroutine)


async def chunks_of(*parts: bytes):
    for part in parts:
        yield part


async def failing_after(data: bytes):
    yield data
    raise ConnectionResetError("client went away")


async def read_all(repo, path) -> bytes:
    stream = await repo.open_read(path)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


def error_of(call) -> RunyardError:
    with pytest.raises(RunyardError) as caught:
        run(call())
    return caught.value


def head(s3, repo, path: str) -> dict:
    return s3.head_object(Bucket=repo.bucket, Key=f"{repo.prefix}/{path}")


def open_uploads(s3, repo) -> list:
    return s3.list_multipart_uploads(Bucket=repo.bucket, Prefix=f"{repo.prefix}/").get("Uploads", [])


def blob(size: int) -> bytes:
    block = hashlib.sha256(str(size).encode()).digest() * 32768  # 1 MiB that is not one repeated byte
    return (block * (size // len(block) + 1))[:size]


# -- writes ----------------------------------------------------------------------------------------

def test_upload_extra_args_reach_small_and_multipart_objects(open_repo, env, s3):
    plain = open_repo()
    run(plain.write("guessed.json", chunks_of(b"{}")))
    assert head(s3, plain, "guessed.json")["ContentType"] == "application/json"  # from the name

    env.setenv("MLFLOW_S3_UPLOAD_EXTRA_ARGS", json.dumps(
        {"Metadata": {"team": "vision"}, "ContentType": "application/x-runyard"}))
    repo = open_repo()
    large = blob(PART_SIZE + 3)
    run(repo.write("small.json", chunks_of(b"{}")))
    run(repo.write("large.json", chunks_of(large)))
    for name in ("small.json", "large.json"):
        answer = head(s3, repo, name)
        assert answer["Metadata"] == {"team": "vision"}
        assert answer["ContentType"] == "application/x-runyard"  # the operator's choice wins
    assert head(s3, repo, "large.json")["ETag"].endswith('-2"')  # it did go the multipart way
    assert run(read_all(repo, "large.json")) == large


def test_bad_extra_args_refused_without_echoing_them(store, env):
    for value in ('{"SSECustomerKey": "hunter2-key"', '["SSECustomerKey", "hunter2-key"]'):
        env.setenv("MLFLOW_S3_UPLOAD_EXTRA_ARGS", value)
        with pytest.raises(RunyardError) as caught:
            repository_for(store.root("extra"))
        assert caught.value.error_code == "INVALID_STATE"
        assert "MLFLOW_S3_UPLOAD_EXTRA_ARGS" in caught.value.message
        assert "hunter2" not in caught.value.message


def test_small_writes_are_one_put_and_large_ones_multipart(repo, s3):
    small = blob(PART_SIZE - 1)
    large = blob(2 * PART_SIZE + 5)
    run(repo.write("small.bin", chunks_of(small)))
    # Many odd-sized chunks: part boundaries fall inside chunks.
    run(repo.write("large.bin", chunks_of(*(large[i:i + 777_777] for i in range(0, len(large), 777_777)))))
    assert "-" not in head(s3, repo, "small.bin")["ETag"]
    assert head(s3, repo, "large.bin")["ETag"].endswith('-3"')
    assert head(s3, repo, "large.bin")["ContentLength"] == len(large)
    assert run(read_all(repo, "small.bin")) == small
    assert run(read_all(repo, "large.bin")) == large
    assert open_uploads(s3, repo) == []


def test_failed_large_write_aborts_its_upload_and_keeps_the_old_object(repo, s3):
    run(repo.write("model.bin", chunks_of(b"old")))
    for path in ("model.bin", "new/model.bin"):
        with pytest.raises(ConnectionResetError):
            run(repo.write(path, failing_after(blob(PART_SIZE + 10))))  # one part stored, then failure
    assert run(read_all(repo, "model.bin")) == b"old"
    assert not run(repo.exists("new/model.bin"))
    assert open_uploads(s3, repo) == []  # the stored part went with the aborted upload


# -- multipart upload and presigned download capabilities ------------------------------------------

def put_parts(credentials, parts: list[bytes]) -> list[UploadedPart]:
    uploaded = []
    for credential, data in zip(credentials, parts, strict=True):
        answer = requests.put(credential.url, data=data, headers=credential.headers, timeout=60)
        assert answer.status_code == 200, answer.text
        uploaded.append(UploadedPart(credential.part_number, answer.headers["ETag"], credential.url))
    return uploaded


def test_multipart_upload_end_to_end(repo, s3):
    parts = [blob(5 * MIB), blob(5 * MIB + 1), b"tail"]
    assert repo.supports_multipart_upload
    upload = run(repo.create_multipart_upload("mpu/big.bin", len(parts)))
    assert [c.part_number for c in upload.credentials] == [1, 2, 3]
    uploaded = put_parts(upload.credentials, parts)
    assert not run(repo.exists("mpu/big.bin"))  # nothing visible before completion
    run(repo.complete_multipart_upload("mpu/big.bin", upload.upload_id, uploaded[::-1]))  # any order
    assert run(read_all(repo, "mpu/big.bin")) == b"".join(parts)
    assert head(s3, repo, "mpu/big.bin")["ETag"].endswith('-3"')
    assert open_uploads(s3, repo) == []


def test_multipart_abort_and_client_mistakes(repo, s3):
    upload = run(repo.create_multipart_upload("mpu/aborted.bin", 2))
    first = put_parts(upload.credentials[:1], [blob(5 * MIB)])[0]
    wrong = [UploadedPart(1, '"0123456789abcdef0123456789abcdef"'), UploadedPart(2, first.etag)]
    assert error_of(lambda: repo.complete_multipart_upload("mpu/aborted.bin", upload.upload_id, wrong)
                    ).error_code == "INVALID_PARAMETER_VALUE"
    assert len(open_uploads(s3, repo)) == 1
    run(repo.abort_multipart_upload("mpu/aborted.bin", upload.upload_id))
    assert open_uploads(s3, repo) == [] and not run(repo.exists("mpu/aborted.bin"))
    assert error_of(lambda: repo.abort_multipart_upload("mpu/aborted.bin", "no-such-upload")
                    ).error_code == "RESOURCE_DOES_NOT_EXIST"
    assert error_of(lambda: repo.complete_multipart_upload("mpu/aborted.bin", upload.upload_id, [first])
                    ).error_code == "RESOURCE_DOES_NOT_EXIST"
    for path in ("../escape.bin", "mpu/", ""):
        error = error_of(lambda p=path: repo.create_multipart_upload(p, 1))
        assert error.error_code == "INVALID_PARAMETER_VALUE", path


def test_presigned_download(repo):
    data = blob(3 * MIB + 1)
    run(repo.write("reports/summary.html", chunks_of(data)))
    assert repo.supports_presigned_download
    presigned = run(repo.presigned_download_url("reports/summary.html", 120))
    assert presigned.file_size == len(data)
    assert parse_qs(urlsplit(presigned.url).query)["X-Amz-Expires"] == ["120"]
    answer = requests.get(presigned.url, headers=presigned.headers, timeout=60)
    assert answer.status_code == 200 and answer.content == data
    assert answer.headers["Content-Disposition"] == 'attachment; filename="summary.html"'  # not rendered
    tampered = presigned.url.replace("summary.html", "other.html")
    assert requests.get(tampered, timeout=60).status_code == 403  # the signature covers the key
    assert error_of(lambda: repo.presigned_download_url("reports/missing.html", 60)
                    ).error_code == "RESOURCE_DOES_NOT_EXIST"
    assert error_of(lambda: repo.presigned_download_url("reports", 60)
                    ).error_code == "INVALID_PARAMETER_VALUE"  # a folder


# -- failures of the server ------------------------------------------------------------------------

def every_call(repo):
    return {"write": lambda: repo.write("x.txt", chunks_of(b"x")), "list_dir": lambda: repo.list_dir(""),
            "stat": lambda: repo.stat("x.txt"), "open_read": lambda: read_all(repo, "x.txt"),
            "delete": lambda: repo.delete("x.txt"),
            "create_multipart_upload": lambda: repo.create_multipart_upload("x.txt", 1)}


def test_missing_bucket_is_a_clear_store_failure(store, env):
    repo = repository_for(f"s3://runyard-missing-{uuid.uuid4().hex[:8]}/root")
    try:
        for name, call in every_call(repo).items():
            error = error_of(call)
            assert error.error_code == "INTERNAL_ERROR", name
            assert error.message.startswith(f"Artifact store {repo.description} refused the request"), name
            assert "NoSuchBucket" in error.message, (name, error.message)
            assert store.env["AWS_SECRET_ACCESS_KEY"] not in error.message
    finally:
        run(repo.aclose())


def test_endpoint_down_is_temporarily_unavailable(store, env):
    env.setenv("MLFLOW_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    env.setenv("AWS_MAX_ATTEMPTS", "1")  # boto3 would otherwise retry with backoff before giving up
    repo = repository_for(store.root("down"))
    try:
        for name, call in every_call(repo).items():
            error = error_of(call)
            assert error.error_code == "TEMPORARILY_UNAVAILABLE", (name, error.message)
            assert error.message.startswith(f"Artifact store {repo.description} cannot be reached"), name
            assert store.env["AWS_SECRET_ACCESS_KEY"] not in error.message
    finally:
        run(repo.aclose())


# -- through a real `runyard server` ---------------------------------------------------------------

def test_server_proxies_to_s3(store, s3, server_factory):
    folder = uuid.uuid4().hex[:8]
    server = server_factory(None, "--artifacts-destination", store.root(folder), env=store.env)
    info = requests.get(f"{server.url}/api/3.0/mlflow/server-info", timeout=10).json()
    assert info["multipart_uploads_enabled"] is True

    data = blob(2 * MIB + 3)
    url = f"{server.url}{ARTIFACTS}/artifacts/1/run/artifacts/model.bin"
    assert requests.put(url, data=data, timeout=60).status_code == 200
    key = f"root/{folder}/1/run/artifacts/model.bin"
    assert s3.head_object(Bucket=store.uri.split("/")[2], Key=key)["ContentLength"] == len(data)  # in S3
    answer = requests.get(url, timeout=60)
    assert answer.status_code == 200 and answer.content == data
    listed = requests.get(f"{server.url}{ARTIFACTS}/artifacts", params={"path": "1/run/artifacts"},
                          timeout=10)
    assert listed.json() == {"files": [{"path": "model.bin", "is_dir": False, "file_size": len(data)}]}

    # The multipart flow of the stock client: create, PUT the parts to S3 directly, complete.
    parts = [blob(5 * MIB), b"rest"]
    created = requests.post(f"{server.url}{ARTIFACTS}/mpu/create/1/run/artifacts",
                            json={"path": "big.bin", "num_parts": 2}, timeout=10)
    assert created.status_code == 200, created.text
    upload_id, credentials = created.json()["upload_id"], created.json()["credentials"]
    etags = [requests.put(c["url"], data=part, timeout=60).headers["ETag"]
             for c, part in zip(credentials, parts, strict=True)]
    completed = requests.post(f"{server.url}{ARTIFACTS}/mpu/complete/1/run/artifacts", timeout=10, json={
        "path": "big.bin", "upload_id": upload_id,
        "parts": [{"part_number": n, "etag": etag} for n, etag in enumerate(etags, 1)]})
    assert completed.status_code == 200, completed.text
    presigned = requests.get(f"{server.url}{ARTIFACTS}/presigned/1/run/artifacts/big.bin", timeout=10).json()
    assert presigned["file_size"] == 5 * MIB + 4
    assert requests.get(presigned["url"], timeout=60).content == b"".join(parts)
    assert store.env["AWS_SECRET_ACCESS_KEY"] not in server.log()


@pytest.mark.e2e
def test_stock_client_uploads_through_proxy_multipart(store, s3, server_factory, tmp_path, monkeypatch):
    import mlflow

    folder = uuid.uuid4().hex[:8]
    server = server_factory(None, "--artifacts-destination", store.root(folder), env=store.env)
    for name, value in {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
                        "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(MIB),
                        "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(5 * MIB)}.items():
        monkeypatch.setenv(name, value)
    mlflow.set_tracking_uri(server.url)
    source = tmp_path / "weights.bin"
    source.write_bytes(blob(11 * MIB))
    mlflow.set_experiment(f"s3-mpu-{uuid.uuid4().hex[:6]}")
    with mlflow.start_run() as run_:
        mlflow.log_artifact(str(source), artifact_path="model")
    root = run_.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    key = f"root/{folder}/{root}/model/weights.bin"
    # Three 5 MiB client parts; a plain PUT through the proxy would have stored two 8 MiB ones.
    assert s3.head_object(Bucket=store.uri.split("/")[2], Key=key)["ETag"].endswith('-3"')
    local = mlflow.artifacts.download_artifacts(run_id=run_.info.run_id, artifact_path="model/weights.bin",
                                                dst_path=str(tmp_path / "out"))
    assert open(local, "rb").read() == source.read_bytes()
