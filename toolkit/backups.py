"""Where backups live and what describes them.

A backup is a folder named `runyard-backup-<UTC time>-<revision>` holding the dump (`database.*`) and
`manifest.json`: the database it came from (without password), dialect, schema revision, per-table row
counts and checksums, the dump's size and SHA-256, the tools' versions and how long it took.

A destination is a local folder (NFS included) or an object-store URI served by the same artifact-store
layer as the server. A backup only ever appears complete: in a folder it is written under a hidden name
and renamed into place; in an object store the manifest is uploaded last, and a backup without one is
not listed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.artifacts import ArtifactRepository, repository_for
from server.errors import RunyardError

MANIFEST = "manifest.json"
FORMAT = 1
PREFIX = "runyard-backup-"
REQUIRED = ("format", "name", "created_at", "dialect", "database", "revision", "data_file", "size_bytes",
            "sha256", "tables", "checksum_method")
CHUNK = 1024 * 1024


def is_local(location: str) -> bool:
    scheme = urlsplit(location).scheme
    return scheme in ("", "file") or len(scheme) == 1


def _local_path(location: str) -> Path:
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path)).resolve()
    return Path(location).expanduser().resolve()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Destination(ABC):
    """A place holding backups, one folder each."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")

    def location_of(self, name: str) -> str:
        return f"{self.location}/{name}"

    @abstractmethod
    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh local folder to write a backup into; removed afterwards unless published."""

    @abstractmethod
    def publish(self, staged: Path, name: str) -> str:
        """Makes the staged folder the backup `name`; returns its location."""

    @abstractmethod
    def names(self) -> list[str]:
        """Complete backups here, oldest first."""

    @abstractmethod
    @contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        """A local folder holding the backup's files."""

    @abstractmethod
    def manifest_text(self, name: str) -> str:
        """The backup's manifest, without fetching the rest."""

    @abstractmethod
    def remove(self, name: str) -> None: ...


class FolderDestination(Destination):
    def __init__(self, location: str):
        super().__init__(location)
        self.root = _local_path(location)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.root))
        except OSError as exc:
            raise RunyardError(f"Cannot write backups to {self.root}: {exc.strerror or exc}",
                               "INVALID_STATE") from None
        try:
            yield staged
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already once published

    def publish(self, staged: Path, name: str) -> str:
        for path in staged.iterdir():
            _fsync(path)
        os.rename(staged, self.root / name)
        _fsync(self.root)
        return str(self.root / name)

    def location_of(self, name: str) -> str:
        return str(self.root / name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir()
                      if entry.name.startswith(PREFIX) and (entry / MANIFEST).is_file())

    @contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        folder = self.root / name
        if not folder.is_dir():
            raise RunyardError(f"No backup at {folder}", "RESOURCE_DOES_NOT_EXIST")
        yield folder

    def manifest_text(self, name: str) -> str:
        return (self.root / name / MANIFEST).read_text()

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name)


class RepositoryDestination(Destination):
    """Backups in an artifact store (S3, GCS, Azure, HDFS, …), staged locally on the way in and out."""

    def __init__(self, location: str, repository: ArtifactRepository):
        super().__init__(location)
        self.repository = repository

    @contextmanager
    def staging(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="runyard-backup-") as folder:
            yield Path(folder)

    def publish(self, staged: Path, name: str) -> str:
        files = sorted(staged.iterdir(), key=lambda path: path.name == MANIFEST)  # the manifest last
        for path in files:
            asyncio.run(self.repository.write(f"{name}/{path.name}", _file_chunks(path)))
        return self.location_of(name)

    def names(self) -> list[str]:
        async def listing() -> list[str]:
            entries = await self.repository.list_dir("")
            return [entry.name for entry in entries if entry.is_dir and entry.name.startswith(PREFIX)
                    and await self.repository.exists(f"{entry.name}/{MANIFEST}")]

        return sorted(asyncio.run(listing()))

    @contextmanager
    def fetch(self, name: str) -> Iterator[Path]:
        async def download(folder: Path) -> None:
            entries = await self.repository.list_dir(name)
            if not entries:
                raise RunyardError(f"No backup at {self.location_of(name)}", "RESOURCE_DOES_NOT_EXIST")
            for entry in entries:
                stream = await self.repository.open_read(f"{name}/{entry.name}")
                try:
                    with open(folder / entry.name, "wb") as handle:
                        async for chunk in stream:
                            handle.write(chunk)
                finally:
                    await stream.aclose()

        with tempfile.TemporaryDirectory(prefix="runyard-backup-") as folder:
            asyncio.run(download(Path(folder)))
            yield Path(folder)

    def manifest_text(self, name: str) -> str:
        async def read() -> bytes:
            stream = await self.repository.open_read(f"{name}/{MANIFEST}")
            try:
                return b"".join([chunk async for chunk in stream])
            finally:
                await stream.aclose()

        return asyncio.run(read()).decode()

    def remove(self, name: str) -> None:
        async def delete() -> None:
            for entry in await self.repository.list_dir(name):
                await self.repository.delete(f"{name}/{entry.name}")
            await self.repository.delete(name)

        asyncio.run(delete())


async def _file_chunks(path: Path):
    with open(path, "rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def destination(location: str) -> Destination:
    if is_local(location):
        return FolderDestination(location)
    return RepositoryDestination(location, repository_for(location))


def split(backup: str) -> tuple[Destination, str]:
    """The destination holding a backup, and the backup's name, from the backup's location."""
    trimmed = backup.rstrip("/")
    if is_local(trimmed):
        path = _local_path(trimmed)
        return FolderDestination(str(path.parent)), path.name
    parent, _, name = trimmed.rpartition("/")
    return destination(parent), name


# ---- manifests --------------------------------------------------------------------------------------

def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: Path, location: str) -> dict:
    """The manifest of the backup in `folder`, checked for shape; RunyardError when it is missing or
    damaged."""
    return parse_manifest(lambda: (folder / MANIFEST).read_text(), location)


def parse_manifest(read_text, location: str) -> dict:
    try:
        manifest = json.loads(read_text())
    except FileNotFoundError:
        raise RunyardError(f"{location} is not a runyard backup: it has no {MANIFEST}",
                           "INVALID_PARAMETER_VALUE") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunyardError(f"Backup {location} is damaged: {MANIFEST} is unreadable ({exc})",
                           "INVALID_STATE") from None
    if not isinstance(manifest, dict) or any(key not in manifest for key in REQUIRED):
        missing = [key for key in REQUIRED if not isinstance(manifest, dict) or key not in manifest]
        raise RunyardError(f"Backup {location} is damaged: {MANIFEST} lacks {', '.join(missing)}",
                           "INVALID_STATE")
    if manifest["format"] > FORMAT:
        raise RunyardError(f"Backup {location} was made by a newer runyard (format {manifest['format']})",
                           "INVALID_STATE")
    return manifest


def check_data_file(folder: Path, manifest: dict, location: str) -> Path:
    """The dump file, after checking it is whole: size and SHA-256 as the manifest records them."""
    data = folder / Path(manifest["data_file"]).name
    if not data.is_file():
        raise RunyardError(f"Backup {location} is damaged: {data.name} is missing", "INVALID_STATE")
    size = data.stat().st_size
    if size != manifest["size_bytes"]:
        raise RunyardError(f"Backup {location} is damaged: {data.name} has {size} bytes, the manifest "
                           f"says {manifest['size_bytes']} (truncated or replaced)", "INVALID_STATE")
    if sha256_of(data) != manifest["sha256"]:
        raise RunyardError(f"Backup {location} is damaged: {data.name} does not match its SHA-256",
                           "INVALID_STATE")
    return data


def prune(dest: Destination, database: str, keep: int) -> list[str]:
    """Deletes all but the newest `keep` backups of `database` in `dest`; returns their locations."""
    mine = []
    for name in dest.names():
        try:
            manifest = parse_manifest(lambda name=name: dest.manifest_text(name), dest.location_of(name))
        except RunyardError:
            continue  # not ours to judge; never delete what we cannot read
        if manifest["database"] == database:
            mine.append((manifest["created_at"], name))
    removed = []
    for _, name in sorted(mine)[:-keep] if keep > 0 else []:
        dest.remove(name)
        removed.append(dest.location_of(name))
    return removed
