"""`runyard tokens`: bearer tokens in the backend store, for NGINX's token auth."""

from __future__ import annotations

import re
from contextlib import contextmanager

from migrations.runner import ensure_schema
from server.errors import invalid
from server.store.tokens import TokenStore, load_pepper
from server.store.tracking import TrackingStore
from toolkit import db

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 7 * 86_400_000}


def parse_duration(text: str) -> int:
    """'90d', '12h', '30m', '45s', '2w' -> milliseconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise invalid(f"Invalid duration {text!r}: use a positive number followed by s, m, h, d or w, "
                      "e.g. 90d.")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


@contextmanager
def open_store(uri: str, pepper_file: str | None):
    pepper = load_pepper(pepper_file)
    with db.engine_for(uri) as engine:
        ensure_schema(engine, uri)  # the server's own check: never write into a mismatched schema
        yield TokenStore(TrackingStore(engine, artifact_root=""), pepper)


def create(uri: str, name: str, user: str | None, expires: str | None, pepper_file: str | None
           ) -> tuple[str, dict]:
    lifetime = parse_duration(expires) if expires else None
    with open_store(uri, pepper_file) as store:
        return store.create(name, user, lifetime)


def list_tokens(uri: str, pepper_file: str | None) -> list[dict]:
    with open_store(uri, pepper_file) as store:
        return store.list()


def revoke(uri: str, name: str, pepper_file: str | None) -> None:
    with open_store(uri, pepper_file) as store:
        store.revoke(name)
