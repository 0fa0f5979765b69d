"""Artifact stores for tests: each module here starts one real or emulated server (design doc, "Real
services in tests") and describes it as a StoreUnderTest.

A module `helpers.stores.<name>` provides `running(workdir) -> ContextManager[StoreUnderTest]`; it raises
helpers.databases.Unavailable when its server cannot run on this machine (missing binary), which skips
the dependent tests, or fails them under RUNYARD_TEST_STRICT=1.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Every store of the conformance suite, in the order the suite runs them.
STORES = ("local", "s3", "azure", "gcs", "ftp", "sftp", "hdfs")


@dataclass
class StoreUnderTest:
    name: str
    uri: str  # an --artifacts-destination; appending "/<folder>" gives a fresh, empty root inside it
    env: dict[str, str] = field(default_factory=dict)  # what a process needs: credentials, endpoints
    # The same environment with a wrong credential (None for a store without credentials), and the
    # secrets that must never appear in an error message or a log.
    bad_env: dict[str, str] | None = None
    secrets: tuple[str, ...] = ()

    def root(self, folder: str) -> str:
        return f"{self.uri.rstrip('/')}/{folder}"


@contextmanager
def running(name: str, workdir: Path) -> Iterator[StoreUnderTest]:
    module = importlib.import_module(f"helpers.stores.{name}")
    workdir.mkdir(parents=True, exist_ok=True)
    with module.running(workdir) as store:
        yield store
