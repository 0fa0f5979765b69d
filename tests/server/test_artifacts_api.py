"""The artifact proxy over real HTTP: RunyardApp under uvicorn in a background thread, driven by requests
(and by http.client where a path must reach the server exactly as written)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from typing import Self
from urllib.parse import quote

import pytest
import requests
import uvicorn
from helpers.bad_paths import BAD_PATHS

import server.app
from server.api import artifacts as artifact_api
from server.api import health
from server.app import RunyardApp
from server.artifacts.base import MultipartUpload, PartCredential, PresignedUrl
from server.artifacts.local import TMP_PREFIX, LocalArtifactRepository
from server.config import ServerConfig
from server.context import Context

API = "/api/2.0/mlflow-artifacts"


class LiveServer:
    """One RunyardApp on a free 127.0.0.1 port, served by uvicorn in a daemon thread."""

    def __init__(self, artifacts, root: str):
        config = ServerConfig(artifacts_destination=root, serve_artifacts=artifacts is not None)
        # Only the routes under test: this suite must not depend on the other API modules.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server.app, "all_routes", lambda: [*health.ROUTES, *artifact_api.ROUTES])
            app = RunyardApp(config, context=Context(config=config, store=None, artifacts=artifacts))
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()

    def raw(self, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
        """Send `target` byte for byte (no client-side normalisation or re-quoting)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in {"Content-Length": str(len(body or b"")), **(headers or {})}.items():
                connection.putheader(name, value)
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("proxy") / "artifacts"


@pytest.fixture(scope="module")
def live(root):
    with LiveServer(LocalArtifactRepository(root), str(root)) as running:
        yield running


@pytest.fixture
def base(live, request) -> str:
    """A fresh folder per test, as a URL prefix: `<server>/api/2.0/mlflow-artifacts/artifacts/<folder>`."""
    return f"{live.url}{API}/artifacts/{request.node.name.split('[')[0]}"


def folder_of(base: str) -> str:
    return base.rsplit("/", 1)[1]


def listing(live, path: str) -> dict:
    response = requests.get(f"{live.url}{API}/artifacts", params={"path": path}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def assert_error(response_or_triple, status: int, code: str):
    if isinstance(response_or_triple, tuple):
        got_status, headers, body = response_or_triple
        payload = json.loads(body)
    else:
        got_status, headers, payload = (response_or_triple.status_code, response_or_triple.headers,
                                        response_or_triple.json())
    assert got_status == status, payload
    assert headers["content-type"].startswith("application/json")
    assert payload["error_code"] == code
    return payload["message"]


# -- upload, list, download, delete ----------------------------------------------------------------

def test_put_then_list_one_level_with_basenames(live, base):
    folder = folder_of(base)
    for path, data in [("hello.txt", b"hello"), ("sub/dir/f.bin", b"\x00\x01"), ("cfg.json", b"{}")]:
        response = requests.put(f"{base}/{path}", data=data, headers={"Content-Type": "text/plain"},
                                timeout=30)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json" and response.json() == {}
    assert listing(live, folder) == {"files": [
        {"path": "cfg.json", "is_dir": False, "file_size": 2},
        {"path": "hello.txt", "is_dir": False, "file_size": 5},
        {"path": "sub", "is_dir": True},
    ]}
    assert listing(live, f"{folder}/sub") == {"files": [{"path": "dir", "is_dir": True}]}
    expected = {"files": [{"path": "f.bin", "is_dir": False, "file_size": 2}]}
    assert listing(live, f"{folder}/sub/dir/") == expected


def test_list_of_a_file_or_missing_folder_is_empty(live, base):
    folder = folder_of(base)
    requests.put(f"{base}/only.txt", data=b"x", timeout=30)
    assert listing(live, f"{folder}/only.txt") == {}
    assert listing(live, f"{folder}/missing") == {}


def test_list_without_path_lists_the_root(live, base):
    requests.put(f"{base}/x.txt", data=b"x", timeout=30)
    response = requests.get(f"{live.url}{API}/artifacts", timeout=30)
    names = {entry["path"] for entry in response.json()["files"]}
    assert folder_of(base) in names


def test_download_streams_bytes_with_headers(live, base):
    payload = os.urandom(3 * 1024 * 1024 + 17)
    requests.put(f"{base}/model/weights.bin", data=payload, headers={"Content-Type": "image/png"}, timeout=30)
    response = requests.get(f"{base}/model/weights.bin", timeout=30)
    assert response.status_code == 200 and response.content == payload
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(payload))
    assert response.headers["content-disposition"] == 'attachment; filename="weights.bin"'
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name, content_type", [
    ("notes.txt", "text/plain"),
    ("cfg.json", "application/json"),
    ("MLmodel", "application/octet-stream"),
    ("plot.png", "image/png"),
])
def test_content_type_is_guessed_from_the_name(base, name, content_type):
    requests.put(f"{base}/{name}", data=b"data", timeout=30)
    assert requests.get(f"{base}/{name}", timeout=30).headers["content-type"] == content_type


def test_non_ascii_name_gets_an_rfc5987_disposition(base):
    requests.put(f"{base}/{quote('résumé.txt')}", data=b"cv", timeout=30)
    response = requests.get(f"{base}/{quote('résumé.txt')}", timeout=30)
    assert response.content == b"cv"
    assert response.headers["content-disposition"] == (
        "attachment; filename=\"r_sum_.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9.txt")


def test_empty_file_round_trip(base):
    assert requests.put(f"{base}/empty", data=b"", timeout=30).status_code == 200
    response = requests.get(f"{base}/empty", timeout=30)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "0"


def test_overwrite_is_allowed(base):
    requests.put(f"{base}/f.txt", data=b"one, the longer", timeout=30)
    requests.put(f"{base}/f.txt", data=b"two", timeout=30)
    assert requests.get(f"{base}/f.txt", timeout=30).content == b"two"


def test_head_gives_headers_without_body(live, base):
    requests.put(f"{base}/h.txt", data=b"12345", timeout=30)
    response = requests.head(f"{base}/h.txt", timeout=30)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "5"
    assert requests.head(f"{base}/missing.txt", timeout=30).status_code == 404


def test_range_requests(base):
    requests.put(f"{base}/r.bin", data=b"0123456789", timeout=30)
    url = f"{base}/r.bin"
    response = requests.get(url, headers={"Range": "bytes=2-4"}, timeout=30)
    assert response.status_code == 206 and response.content == b"234"
    assert response.headers["content-range"] == "bytes 2-4/10"
    assert requests.get(url, headers={"Range": "bytes=7-"}, timeout=30).content == b"789"
    assert requests.get(url, headers={"Range": "bytes=-3"}, timeout=30).content == b"789"
    assert requests.get(url, headers={"Range": "bytes=5-100"}, timeout=30).content == b"56789"
    unsatisfiable = requests.get(url, headers={"Range": "bytes=10-"}, timeout=30)
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == "bytes */10"
    whole = requests.get(url, headers={"Range": "bytes=0-1,4-5"}, timeout=30)  # multi-range: ignored
    assert whole.status_code == 200 and whole.content == b"0123456789"


def test_missing_file_is_404_and_folder_is_400(base):
    requests.put(f"{base}/d/f.txt", data=b"x", timeout=30)
    message = assert_error(requests.get(f"{base}/d/nope.txt", timeout=30), 404, "RESOURCE_DOES_NOT_EXIST")
    assert "d/nope.txt" in message
    assert_error(requests.get(f"{base}/d", timeout=30), 400, "INVALID_PARAMETER_VALUE")
    assert_error(requests.get(f"{base}/d/", timeout=30), 400, "INVALID_PARAMETER_VALUE")


def test_put_to_a_trailing_slash_or_onto_a_folder_is_400(base):
    requests.put(f"{base}/d/f.txt", data=b"x", timeout=30)
    assert_error(requests.put(f"{base}/d/", data=b"x", timeout=30), 400, "INVALID_PARAMETER_VALUE")
    assert_error(requests.put(f"{base}/d", data=b"x", timeout=30), 400, "INVALID_PARAMETER_VALUE")
    assert_error(requests.put(f"{base}/d/f.txt/g", data=b"x", timeout=30), 400, "INVALID_PARAMETER_VALUE")
    assert requests.get(f"{base}/d/f.txt", timeout=30).content == b"x"


def test_delete_file_and_folder(live, base):
    folder = folder_of(base)
    for path in ("a.txt", "d/b.txt", "d/e/c.txt"):
        requests.put(f"{base}/{path}", data=b"x", timeout=30)
    response = requests.delete(f"{base}/a.txt", timeout=30)
    assert response.status_code == 200 and response.json() == {}
    assert requests.delete(f"{base}/d", timeout=30).status_code == 200
    assert listing(live, folder) == {}
    assert_error(requests.delete(f"{base}/d", timeout=30), 404, "RESOURCE_DOES_NOT_EXIST")


def test_delete_of_the_root_is_refused(live, root, base):
    requests.put(f"{base}/keep.txt", data=b"x", timeout=30)
    assert_error(live.raw("DELETE", f"{API}/artifacts/"), 400, "INVALID_PARAMETER_VALUE")
    assert_error(live.raw("DELETE", f"{API}/artifacts/./"), 400, "INVALID_PARAMETER_VALUE")
    assert requests.get(f"{base}/keep.txt", timeout=30).content == b"x"


def test_ajax_prefix_serves_the_same_routes(live, base):
    folder = folder_of(base)
    requests.put(f"{base}/a.txt", data=b"ajax", timeout=30)
    response = requests.get(f"{live.url}/ajax-api/2.0/mlflow-artifacts/artifacts/{folder}/a.txt", timeout=30)
    assert response.content == b"ajax"


def test_wrong_method_is_405_json(live):
    status, headers, _ = live.raw("PUT", f"{API}/artifacts")
    assert status == 405 and headers["content-type"] == "application/json"


# -- bad paths, on every route ---------------------------------------------------------------------

def _url_form(path: str) -> str:
    # NUL cannot travel raw in a request line and a raw '#' starts the fragment (which never reaches the
    # server), so those two are percent-encoded; everything else goes verbatim.
    return path.replace("\x00", "%00").replace("#", "%23")


FILE_ROUTES = [
    ("GET", "artifacts"), ("HEAD", "artifacts"), ("PUT", "artifacts"), ("DELETE", "artifacts"),
    ("POST", "mpu/create"), ("POST", "mpu/complete"), ("POST", "mpu/abort"), ("GET", "presigned"),
]


@pytest.fixture
def outside(root):
    """A folder beside the artifact root that no request may touch."""
    path = root.parent / "outside"
    path.mkdir(exist_ok=True)
    (path / "secret.txt").write_text("secret")
    return path


@pytest.mark.parametrize("method, route", FILE_ROUTES)
@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_400_on_every_file_route(live, root, outside, method, route, path):
    body = b'{"path": "f.bin", "num_parts": 1, "upload_id": "u", "parts": []}'
    before = sorted(p for p in os.listdir(root.parent))
    status, headers, payload = live.raw(method, f"{API}/{route}/{_url_form(path)}", body,
                                        {"Content-Type": "application/json"})
    assert status == 400, (status, payload)
    if method != "HEAD":
        assert_error((status, headers, payload), 400, "INVALID_PARAMETER_VALUE")
        assert b"Invalid path" in payload
    assert sorted(os.listdir(root.parent)) == before
    assert os.listdir(outside) == ["secret.txt"] and (outside / "secret.txt").read_text() == "secret"


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_are_400_on_list(live, path):
    for target in (f"{API}/artifacts?path={quote(path, safe='')}", f"{API}/artifacts?path={_url_form(path)}"):
        message = assert_error(live.raw("GET", target), 400, "INVALID_PARAMETER_VALUE")
        assert message.startswith("Invalid path")


@pytest.fixture
def links(root, outside):
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("link-out", outside), ("link-secret", outside / "secret.txt")):
        if not os.path.islink(root / name):
            os.symlink(target, root / name)
    yield
    os.unlink(root / "link-out")
    os.unlink(root / "link-secret")


@pytest.mark.parametrize("method, path", [
    ("GET", "link-out/secret.txt"), ("GET", "link-secret"), ("HEAD", "link-secret"),
    ("PUT", "link-out/new.txt"), ("PUT", "link-secret"),
    ("DELETE", "link-out/secret.txt"), ("DELETE", "link-out"), ("DELETE", "link-secret"),
])
def test_symlink_escape_is_400(live, outside, links, method, path):
    status, _, payload = live.raw(method, f"{API}/artifacts/{path}", b"pwned")
    assert status == 400, payload
    assert os.listdir(outside) == ["secret.txt"] and (outside / "secret.txt").read_text() == "secret"


def test_symlink_escape_is_400_on_list_and_hidden_from_listings(live, links):
    assert_error(requests.get(f"{live.url}{API}/artifacts", params={"path": "link-out"}, timeout=30),
                 400, "INVALID_PARAMETER_VALUE")
    names = {entry["path"] for entry in listing(live, "").get("files", [])}
    assert "link-out" not in names and "link-secret" not in names


# -- aborted uploads -------------------------------------------------------------------------------

def test_aborted_upload_leaves_no_file(live, root, base):
    folder = folder_of(base)
    requests.put(f"{base}/keep.bin", data=b"old", timeout=30)
    for name in ("new.bin", "keep.bin"):
        with socket.create_connection(("127.0.0.1", live.port)) as connection:
            connection.sendall(
                f"PUT {API}/artifacts/{folder}/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: 10000000\r\n\r\n".encode() + b"x" * 3_000_000)
        # The server may not have begun the upload when the client is gone: wait until the folder has
        # held no temporary file for half a second (a settle, not a timing assertion).
        deadline, clean_since = time.monotonic() + 10, None
        while clean_since is None or time.monotonic() - clean_since < 0.5:
            assert time.monotonic() < deadline, "the aborted upload's temporary file was not removed"
            if any(f.startswith(TMP_PREFIX) for f in os.listdir(root / folder)):
                clean_since = None
            elif clean_since is None:
                clean_since = time.monotonic()
            time.sleep(0.02)
    assert sorted(os.listdir(root / folder)) == ["keep.bin"]
    assert requests.get(f"{base}/keep.bin", timeout=30).content == b"old"


# -- capabilities the local store lacks ------------------------------------------------------------

@pytest.mark.parametrize("route", ["mpu/create", "mpu/complete", "mpu/abort"])
def test_multipart_is_501_for_the_local_store(live, route):
    response = requests.post(f"{live.url}{API}/{route}/1/run/artifacts",
                             json={"path": "big.bin", "num_parts": 3, "upload_id": "u", "parts": []},
                             timeout=30)
    assert_error(response, 501, "NOT_IMPLEMENTED")


def test_presigned_is_501_for_the_local_store(live, base):
    requests.put(f"{base}/f.bin", data=b"x", timeout=30)
    url = base.replace("/artifacts/", "/presigned/", 1) + "/f.bin"
    assert_error(requests.get(url, timeout=30), 501, "NOT_IMPLEMENTED")


class _ObjectStoreDouble(LocalArtifactRepository):
    """A local store that claims the object-store capabilities, to exercise the proxy's plumbing."""

    supports_multipart_upload = True
    supports_presigned_download = True

    def __init__(self, root):
        super().__init__(root)
        self.calls = []

    async def create_multipart_upload(self, path, num_parts):
        self.calls.append(("create", path, num_parts))
        return MultipartUpload("up-1", [PartCredential(n, f"https://store/{path}?part={n}", {"x-h": "v"})
                                        for n in range(1, num_parts + 1)])

    async def complete_multipart_upload(self, path, upload_id, parts):
        self.calls.append(("complete", path, upload_id, [(p.part_number, p.etag) for p in parts]))

    async def abort_multipart_upload(self, path, upload_id):
        self.calls.append(("abort", path, upload_id))

    async def presigned_download_url(self, path, expires_in):
        return PresignedUrl(f"https://store/{path}?ttl={expires_in}", {"x-h": "v"}, 42)


def test_capable_store_gets_multipart_and_presigned_calls(tmp_path):
    store = _ObjectStoreDouble(tmp_path / "objects")
    with LiveServer(store, str(tmp_path / "objects")) as running:
        mpu = f"{running.url}{API}/mpu"
        created = requests.post(f"{mpu}/create/1/r/artifacts", json={"path": "big.bin", "num_parts": 2},
                                timeout=30).json()
        assert created == {"upload_id": "up-1", "credentials": [
            {"url": "https://store/1/r/artifacts/big.bin?part=1", "part_number": 1, "headers": {"x-h": "v"}},
            {"url": "https://store/1/r/artifacts/big.bin?part=2", "part_number": 2, "headers": {"x-h": "v"}},
        ]}
        done = requests.post(f"{mpu}/complete/1/r/artifacts", timeout=30, json={
            "path": "big.bin", "upload_id": "up-1",
            "parts": [{"part_number": 1, "etag": "e1", "url": "u1"}, {"part_number": "2", "etag": "e2"}]})
        assert done.status_code == 200 and done.json() == {}
        assert requests.post(f"{mpu}/abort/1/r/artifacts", json={"path": "big.bin", "upload_id": "up-1"},
                             timeout=30).json() == {}
        presigned = requests.get(f"{running.url}{API}/presigned/1/r/artifacts/big.bin", timeout=30).json()
        assert presigned == {"url": "https://store/1/r/artifacts/big.bin?ttl=300", "headers": {"x-h": "v"},
                             "file_size": 42}
        for bad in ("..", "dir/", "C:\\tmp\\.."):
            assert_error(requests.post(f"{mpu}/create/1/r", json={"path": bad, "num_parts": 2}, timeout=30),
                         400, "INVALID_PARAMETER_VALUE")
        assert_error(requests.post(f"{mpu}/create/1/r", json={"path": "x", "num_parts": 0}, timeout=30),
                     400, "INVALID_PARAMETER_VALUE")
        assert_error(requests.post(f"{mpu}/abort/1/r", data=b"{not json", timeout=30),
                     400, "INVALID_PARAMETER_VALUE")
    assert store.calls == [
        ("create", "1/r/artifacts/big.bin", 2),
        ("complete", "1/r/artifacts/big.bin", "up-1", [(1, "e1"), (2, "e2")]),
        ("abort", "1/r/artifacts/big.bin", "up-1"),
    ]


# -- serving disabled ------------------------------------------------------------------------------

def test_every_route_is_503_text_when_serving_is_disabled(tmp_path):
    with LiveServer(None, str(tmp_path / "unused")) as running:
        for method, route in [("GET", "artifacts?path=x"), *((m, f"{r}/a/b.txt") for m, r in FILE_ROUTES)]:
            status, headers, body = running.raw(method, f"{API}/{route}", b"{}")
            assert status == 503, (method, route)
            assert headers["content-type"].startswith("text/plain")
            if method != "HEAD":
                assert b"--serve-artifacts" in body
    assert not (tmp_path / "unused").exists()


# -- large transfers in constant memory ------------------------------------------------------------

def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current RSS
        clear_refs.write("5")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_200_mb_upload_and_download_in_flat_memory(base):
    size_mb = 200
    block = bytes(range(256)) * 4096  # 1 MiB
    sent = hashlib.sha256()

    def body():
        for index in range(size_mb):
            chunk = index.to_bytes(8, "big") + block[8:]
            sent.update(chunk)
            yield chunk

    _reset_peak_rss()
    before = _peak_rss_bytes()
    response = requests.put(f"{base}/big.bin", data=body(), timeout=120)
    assert response.status_code == 200, response.text
    received = hashlib.sha256()
    length = 0
    with requests.get(f"{base}/big.bin", stream=True, timeout=120) as download:
        assert download.headers["content-length"] == str(size_mb * len(block))
        for chunk in download.iter_content(chunk_size=1024 * 1024):
            received.update(chunk)
            length += len(chunk)
    growth = _peak_rss_bytes() - before
    assert length == size_mb * len(block) and received.digest() == sent.digest()
    # Server and client share this process: the whole round trip may not grow it by a file's worth.
    assert growth < 64 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB"
