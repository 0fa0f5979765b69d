"""What only the Azure Blob and GCS stores do, against their emulators (Azurite, fake-gcs-server): how a
large write reaches the service (staged blocks, a resumable upload), that a failed one leaves nothing,
the other ways to give Azure credentials, and how misconfiguration and outages are reported. Then one
round trip per store through a real `runyard server`. The shared contract is test_artifact_stores.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import uuid

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import (
    AccountSasPermissions,
    BlobServiceClient,
    ResourceTypes,
    generate_account_sas,
)
from helpers import databases
from helpers.ports import free_port
from helpers.stores import StoreUnderTest, running
from helpers.stores import azure as azurite
from helpers.stores import gcs as fake_gcs

from server.artifacts import azure as azure_store
from server.artifacts import gcs as gcs_store
from server.artifacts import repository_for
from server.artifacts.base import FileInfo
from server.errors import RunyardError

MIB = 2**20
API = "/api/2.0/mlflow-artifacts/artifacts"


def run(coroutine):
    return asyncio.run(coroutine)


async def chunks_of(data: bytes, size: int = MIB):
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def read_all(repo, path) -> bytes:
    stream = await repo.open_read(path)
    try:
        return b"".join([chunk async for chunk in stream])
    finally:
        await stream.aclose()


def failure(call) -> RunyardError:
    with pytest.raises(RunyardError) as caught:
        run(call())
    return caught.value


def pattern(size: int) -> bytes:
    """Bytes in which every MiB differs, so a misplaced or repeated block shows."""
    return b"".join(i.to_bytes(4, "big") * (MIB // 4) for i in range(-(-size // MIB)))[:size]


def _started(name: str, tmp_path_factory):
    try:
        with running(name, tmp_path_factory.mktemp(name)) as store:
            yield store
    except databases.Unavailable as exc:
        if os.environ.get("RUNYARD_TEST_STRICT") == "1":
            pytest.fail(f"{exc} (RUNYARD_TEST_STRICT=1: required services must be available)")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def azure(tmp_path_factory) -> StoreUnderTest:
    yield from _started("azure", tmp_path_factory)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory) -> StoreUnderTest:
    yield from _started("gcs", tmp_path_factory)


def open_store(store: StoreUnderTest, monkeypatch, uri: str | None = None, env: dict | None = None):
    for name, value in (store.env if env is None else env).items():
        monkeypatch.setenv(name, value)
    return repository_for(uri or store.root(uuid.uuid4().hex[:12]))


@pytest.fixture
def azure_repo(azure, monkeypatch):
    repository = open_store(azure, monkeypatch)
    yield repository
    run(repository.aclose())


@pytest.fixture
def gcs_repo(gcs, monkeypatch):
    repository = open_store(gcs, monkeypatch)
    yield repository
    run(repository.aclose())


# -- Azure ----------------------------------------------------------------------------------------------

def container_client(store: StoreUnderTest):
    service = BlobServiceClient.from_connection_string(store.env["AZURE_STORAGE_CONNECTION_STRING"])
    return service.get_container_client(azurite.CONTAINER)


def test_azure_large_write_stages_blocks_and_commits_them_at_the_end(azure, azure_repo):
    block = azure_store.BLOCK_SIZE
    data = pattern(2 * block + 12345)
    blob = container_client(azure).get_blob_client(f"{azure_repo.prefix}/big/data.bin")
    seen_while_writing = {}

    async def body():
        async for chunk in chunks_of(data[:2 * block + MIB]):
            yield chunk
        # Two blocks are staged by now, yet no reader may see the blob before the commit.
        seen_while_writing["uncommitted"] = len((await asyncio.to_thread(blob.get_block_list, "all"))[1])
        try:
            await asyncio.to_thread(blob.get_blob_properties)
            seen_while_writing["visible"] = True
        except ResourceNotFoundError:
            seen_while_writing["visible"] = False
        async for chunk in chunks_of(data[2 * block + MIB:]):
            yield chunk

    assert run(azure_repo.write("big/data.bin", body())) == len(data)
    assert seen_while_writing == {"uncommitted": 2, "visible": False}
    committed, uncommitted = blob.get_block_list("all")
    assert [b.size for b in committed] == [block, block, 12345] and uncommitted == []
    assert run(read_all(azure_repo, "big/data.bin")) == data


async def fails_after(data: bytes):
    async for chunk in chunks_of(data):
        yield chunk
    raise ConnectionResetError("client went away")


def test_azure_failed_large_write_commits_nothing(azure, azure_repo):
    run(azure_repo.write("old.bin", chunks_of(b"old")))
    body = pattern(2 * azure_store.BLOCK_SIZE + 10)
    for name in ("old.bin", "new.bin"):
        with pytest.raises(ConnectionResetError):
            run(azure_repo.write(name, fails_after(body)))
    container = container_client(azure)
    assert container.get_blob_client(f"{azure_repo.prefix}/old.bin").download_blob().readall() == b"old"
    assert run(read_all(azure_repo, "old.bin")) == b"old"
    with pytest.raises(ResourceNotFoundError):
        container.get_blob_client(f"{azure_repo.prefix}/new.bin").get_blob_properties()
    assert run(azure_repo.list_dir("")) == [FileInfo("old.bin", False, 3)]


def account_sas(**permissions) -> str:
    return generate_account_sas(azurite.ACCOUNT, azurite.KEY,
                                ResourceTypes(service=True, container=True, object=True),
                                AccountSasPermissions(**permissions),
                                expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))


def endpoint_only(store: StoreUnderTest) -> str:
    """The emulator's connection string without its AccountKey: the endpoint alone."""
    fields = store.env["AZURE_STORAGE_CONNECTION_STRING"].split(";")
    return ";".join(f for f in fields if not f.startswith(("AccountKey=", "AccountName=")))


@pytest.mark.parametrize("variable", ["AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN"])
def test_azure_account_key_or_sas_token_for_the_connection_strings_endpoint(azure, monkeypatch, variable):
    secret = azurite.KEY if variable == "AZURE_STORAGE_ACCESS_KEY" else account_sas(
        read=True, write=True, delete=True, list=True, add=True, create=True)
    repo = open_store(azure, monkeypatch, env={"AZURE_STORAGE_CONNECTION_STRING": endpoint_only(azure),
                                               variable: secret})
    try:
        assert run(repo.write("d/f.bin", chunks_of(pattern(5 * MIB)))) == 5 * MIB
        assert run(read_all(repo, "d/f.bin")) == pattern(5 * MIB)
        assert run(repo.list_dir("d")) == [FileInfo("f.bin", False, 5 * MIB)]
        assert run(repo.delete("d")) is True and run(repo.stat("d")) is None
    finally:
        run(repo.aclose())


@pytest.mark.parametrize("variable", ["AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN"])
def test_azure_refused_key_or_sas_token_is_a_store_failure_without_the_secret(azure, monkeypatch, variable):
    read_only = account_sas(read=True, list=True)
    secret = azurite.WRONG_KEY if variable == "AZURE_STORAGE_ACCESS_KEY" else read_only
    repo = open_store(azure, monkeypatch, env={"AZURE_STORAGE_CONNECTION_STRING": endpoint_only(azure),
                                               variable: secret})
    try:
        error = failure(lambda: repo.write("x.txt", chunks_of(b"x")))
    finally:
        run(repo.aclose())
    assert error.error_code == "INTERNAL_ERROR"
    assert error.message.startswith(f"Artifact store {repo.description} refused the request: ")
    signature = secret.split("sig=")[-1]
    assert secret not in error.message and signature not in error.message and azurite.KEY not in error.message


def test_azure_missing_container_is_a_store_failure(azure, monkeypatch):
    uri = f"wasbs://no-such-container@{azurite.ACCOUNT}.blob.core.windows.net/artifacts"
    repo = open_store(azure, monkeypatch, uri=uri)
    try:
        for call in (lambda: repo.write("x.txt", chunks_of(b"x")), lambda: repo.list_dir(""),
                     lambda: repo.stat("x.txt"), lambda: read_all(repo, "x.txt")):
            error = failure(call)
            assert error.error_code == "INTERNAL_ERROR", error.message
            assert error.message.startswith(f"Artifact store {uri} refused the request: ")
            assert "ContainerNotFound" in error.message and azurite.KEY not in error.message
    finally:
        run(repo.aclose())


def test_azure_unreachable_service_is_temporarily_unavailable(azure, monkeypatch):
    nowhere = f"http://127.0.0.1:{free_port()}/{azurite.ACCOUNT}"  # nothing listens there
    repo = open_store(azure, monkeypatch,
                      env={"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(nowhere)})
    try:
        error = failure(lambda: repo.list_dir(""))
    finally:
        run(repo.aclose())
    assert error.error_code == "TEMPORARILY_UNAVAILABLE"
    assert error.message.startswith(f"Artifact store {repo.description} cannot be reached: ")
    assert azurite.KEY not in error.message


# -- GCS ------------------------------------------------------------------------------------------------

class RecordedSession:
    """Records the resumable-upload requests the store sends (they still go to the emulator)."""

    def __init__(self, repo):
        self.requests: list[tuple[str, str | None]] = []
        session = repo._http
        self._put, self._delete = session.put, session.delete
        session.put, session.delete = self.put, self.delete

    def put(self, url, **kwargs):
        self.requests.append(("PUT", kwargs["headers"]["Content-Range"]))
        return self._put(url, **kwargs)

    def delete(self, url, **kwargs):
        response = self._delete(url, **kwargs)
        self.requests.append(("DELETE", str(response.status_code)))
        return response


def gcs_blob(store: StoreUnderTest, name: str):
    client = fake_gcs.emulator_client(store.env["STORAGE_EMULATOR_HOST"])
    return client.bucket(fake_gcs.BUCKET).get_blob(name)


def test_gcs_large_write_is_one_resumable_upload_finalised_by_its_last_chunk(gcs, gcs_repo):
    chunk = gcs_store.UPLOAD_CHUNK_SIZE
    data = pattern(2 * chunk + 5)
    recorded = RecordedSession(gcs_repo)
    seen_while_writing = []

    async def body():
        async for piece in chunks_of(data[:chunk + MIB]):
            yield piece
        # The first chunk has been sent; the object must not exist before the last one.
        seen_while_writing.append(await asyncio.to_thread(gcs_blob, gcs, f"{gcs_repo.prefix}/big.bin"))
        async for piece in chunks_of(data[chunk + MIB:]):
            yield piece

    assert run(gcs_repo.write("big.bin", body())) == len(data)
    assert seen_while_writing == [None]
    assert recorded.requests == [("PUT", f"bytes 0-{chunk - 1}/*"),
                                 ("PUT", f"bytes {chunk}-{2 * chunk - 1}/*"),
                                 ("PUT", f"bytes {2 * chunk}-{2 * chunk + 4}/{2 * chunk + 5}")]
    assert gcs_blob(gcs, f"{gcs_repo.prefix}/big.bin").size == len(data)
    assert run(read_all(gcs_repo, "big.bin")) == data

    recorded.requests.clear()  # a small body is a single request, no session
    run(gcs_repo.write("small.bin", chunks_of(pattern(chunk))))
    assert recorded.requests == [] and run(read_all(gcs_repo, "small.bin")) == pattern(chunk)


def test_gcs_failed_large_write_is_never_finalised(gcs, gcs_repo):
    run(gcs_repo.write("old.bin", chunks_of(b"old")))
    recorded = RecordedSession(gcs_repo)
    body = pattern(2 * gcs_store.UPLOAD_CHUNK_SIZE + 10)
    for name in ("old.bin", "new.bin"):
        with pytest.raises(ConnectionResetError):
            run(gcs_repo.write(name, fails_after(body)))
    assert run(read_all(gcs_repo, "old.bin")) == b"old"
    assert gcs_blob(gcs, f"{gcs_repo.prefix}/new.bin") is None
    assert run(gcs_repo.list_dir("")) == [FileInfo("old.bin", False, 3)]
    # Each upload sent its two full chunks, never a last one, then cancelled its session (499).
    chunk = gcs_store.UPLOAD_CHUNK_SIZE
    sent = [("PUT", f"bytes 0-{chunk - 1}/*"), ("PUT", f"bytes {chunk}-{2 * chunk - 1}/*"), ("DELETE", "499")]
    assert recorded.requests == sent + sent


def test_gcs_missing_bucket_is_a_store_failure(gcs, monkeypatch):
    uri = "gs://no-such-bucket/artifacts"
    repo = open_store(gcs, monkeypatch, uri=uri)
    try:
        for call in (lambda: repo.write("x.txt", chunks_of(b"x")), lambda: repo.list_dir(""),
                     lambda: repo.stat("x.txt"), lambda: read_all(repo, "x.txt")):
            error = failure(call)
            assert error.error_code == "INTERNAL_ERROR", error.message
            assert error.message.startswith(f"Artifact store {uri} refused the request: ")
            assert "404" in error.message
    finally:
        run(repo.aclose())


def test_gcs_emulator_down_is_temporarily_unavailable(monkeypatch, tmp_path):
    with fake_gcs.start(tmp_path) as url:
        client = fake_gcs.emulator_client(url)
        client.create_bucket(fake_gcs.BUCKET)
        client.close()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        repo = repository_for(f"gs://{fake_gcs.BUCKET}/artifacts")
        run(repo.write("a.txt", chunks_of(b"a")))
    try:  # the emulator is stopped now
        for call in (lambda: repo.list_dir(""), lambda: read_all(repo, "a.txt")):
            error = failure(call)
            assert error.error_code == "TEMPORARILY_UNAVAILABLE", error.message
            assert error.message.startswith(f"Artifact store {repo.description} cannot be reached: ")
    finally:
        run(repo.aclose())


# -- through a real `runyard server` ---------------------------------------------------------------

@pytest.mark.parametrize("store_fixture", ["azure", "gcs"])
def test_put_get_and_list_through_a_runyard_server(request, server_factory, store_fixture):
    store: StoreUnderTest = request.getfixturevalue(store_fixture)
    server = server_factory(None, "--artifacts-destination", store.root(uuid.uuid4().hex[:8]), env=store.env)
    base = f"{server.url}{API}/1/run/artifacts"
    large = pattern(9 * MIB + 3)  # several Azure blocks, a resumable GCS upload

    def body():
        yield from (large[i:i + MIB] for i in range(0, len(large), MIB))

    assert requests.put(f"{base}/model/weights.bin", data=body(), timeout=120).status_code == 200
    assert requests.put(f"{base}/notes.txt", data=b"hello", timeout=30).status_code == 200
    response = requests.get(f"{base}/model/weights.bin", timeout=120)
    assert response.status_code == 200 and response.content == large
    partial = requests.get(f"{base}/notes.txt", headers={"Range": "bytes=1-3"}, timeout=30)
    assert partial.status_code == 206 and partial.content == b"ell"
    listing = requests.get(f"{server.url}{API}", params={"path": "1/run/artifacts"}, timeout=30)
    assert listing.status_code == 200, listing.text
    assert listing.json() == {"files": [{"path": "model", "is_dir": True},
                                        {"path": "notes.txt", "is_dir": False, "file_size": 5}]}
    listing = requests.get(f"{server.url}{API}", params={"path": "1/run/artifacts/model"}, timeout=30)
    assert listing.json() == {"files": [{"path": "weights.bin", "is_dir": False, "file_size": len(large)}]}
    assert requests.get(f"{base}/missing.txt", timeout=30).status_code == 404


def test_refused_credentials_through_a_runyard_server_stay_out_of_answer_and_log(azure, server_factory):
    server = server_factory(None, "--artifacts-destination", azure.root("denied"), env=azure.bad_env)
    response = requests.put(f"{server.url}{API}/x.txt", data=b"x", timeout=60)
    assert response.status_code == 500 and response.json()["error_code"] == "INTERNAL_ERROR"
    for secret in (azurite.WRONG_KEY, azurite.KEY):
        assert secret not in response.text and secret not in server.log()
