"""A local folder: what plain paths, file: URIs and NFS mounts give the server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helpers.stores import StoreUnderTest


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    yield StoreUnderTest("local", str(workdir / "artifacts"))
