"""Azure Blob Storage: Azurite, Microsoft's emulator (npm), blob service only, on a free port with its
state in the work dir. Azurite checks the Shared Key signature, so a wrong AccountKey is refused."""

from __future__ import annotations

import base64
import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from azure.storage.blob import BlobServiceClient

from helpers.databases import Unavailable
from helpers.ports import free_port, port_open, wait_for
from helpers.stores import StoreUnderTest

AZURITE = Path.home() / ".cache" / "runyard-tests" / "npm" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: a public constant, the same in every Azurite.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# A well-formed key of the same length that is not the account's: the signature check fails.
WRONG_KEY = base64.b64encode(hashlib.sha512(b"not the key").digest()).decode()
CONTAINER = "runyard"


def connection_string(endpoint: str, key: str | None = KEY) -> str:
    credential = f"AccountName={ACCOUNT};AccountKey={key};" if key else ""
    return f"DefaultEndpointsProtocol=http;{credential}BlobEndpoint={endpoint};"


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    if not AZURITE.exists() or shutil.which("node") is None:
        raise Unavailable(f"Azurite is not installed ({AZURITE}): npm install --prefix "
                          f"{AZURITE.parents[2]} azurite@3")
    port = free_port()
    (workdir / "azurite").mkdir(exist_ok=True)
    log_path = workdir / "azurite.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                                 "--location", str(workdir / "azurite"), "--silent", "--skipApiVersionCheck",
                                 "--loose", "--disableTelemetry"], stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_for(lambda: proc.poll() is not None or port_open(port), timeout=60)
        if not ready or proc.poll() is not None:
            raise RuntimeError(f"Azurite did not start (exit code {proc.returncode}): "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
        with BlobServiceClient.from_connection_string(connection_string(endpoint)) as service:
            service.create_container(CONTAINER)
        yield StoreUnderTest(
            "azure", f"wasbs://{CONTAINER}@{ACCOUNT}.blob.core.windows.net/artifacts",
            env={"AZURE_STORAGE_CONNECTION_STRING": connection_string(endpoint)},
            bad_env={"AZURE_STORAGE_CONNECTION_STRING": connection_string(endpoint, WRONG_KEY)},
            secrets=(KEY,))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
