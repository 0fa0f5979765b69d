"""Bearer tokens: created and revoked by `runyard tokens`, checked by the server for NGINX's auth_request.

A token is 256 random bits, shown once. The database keeps only HMAC-SHA256(pepper, token): a stolen copy
of the database yields no usable token, and with a pepper kept outside the database (a file the server
reads) it does not even allow checking guesses. Tokens are looked up by that hash, so checking one is a
single indexed read; revocation deletes the row and takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

import sqlalchemy as sa

from server.errors import already_exists, invalid, not_found
from server.store.schema import access_tokens
from server.store.tracking import TrackingStore, now_ms

TOKEN_PREFIX = "ryt_"  # recognisable in a leaked log or a secret scanner's rule
PEPPER_ENV = "RUNYARD_TOKEN_PEPPER_FILE"
LAST_USED_RESOLUTION_MS = 60_000  # a busy token costs one write a minute, not one per request

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,254}")
_USER = re.compile(r"[!-9;-~]{1,255}")  # printable ASCII without space or ':' (htpasswd's separator)


def validate_user(user: str) -> str:
    if not _USER.fullmatch(user or ""):
        raise invalid(f"Invalid user name {user!r}: use 1-255 printable ASCII characters, without spaces "
                      "or ':'.")
    return user


def load_pepper(path: str | None) -> bytes:
    """The pepper from a file (surrounding whitespace ignored); none configured: an empty key."""
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            pepper = f.read().strip()
    except OSError as exc:
        raise invalid(f"Cannot read the token pepper file {path}: {exc.strerror}") from None
    if not pepper:
        raise invalid(f"The token pepper file {path} is empty.")
    return pepper


class TokenStore:
    def __init__(self, tracking: TrackingStore, pepper: bytes = b""):
        self.tracking = tracking
        self.pepper = pepper

    def _hash(self, token: str) -> str:
        return hmac.new(self.pepper, token.encode(), hashlib.sha256).hexdigest()

    def create(self, name: str, user: str | None = None, expires_in_ms: int | None = None
               ) -> tuple[str, dict]:
        """A new token for `user` (default: the token's name); returns (token, its listing)."""
        if not _NAME.fullmatch(name or ""):
            raise invalid(f"Invalid token name {name!r}: use 1-255 letters, digits and . _ @ -, starting "
                          "with a letter or digit.")
        user = validate_user(user if user is not None else name)
        if expires_in_ms is not None and expires_in_ms <= 0:
            raise invalid("A token's lifetime must be positive.")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = now_ms()
        row = {"name": name, "user_name": user, "token_hash": self._hash(token), "created_time": created,
               "expires_time": created + expires_in_ms if expires_in_ms is not None else None,
               "last_used_time": None}

        def insert(conn):
            if conn.execute(sa.select(access_tokens.c.name).where(access_tokens.c.name == name)).first():
                raise already_exists(f"A token named '{name}' already exists; revoke it first or pick "
                                     "another name.")
            conn.execute(access_tokens.insert(), row)

        self.tracking.write(insert)
        return token, _listing(row, created)

    def list(self) -> list[dict]:
        def select(conn):
            query = sa.select(access_tokens).order_by(access_tokens.c.created_time, access_tokens.c.name)
            return [r._asdict() for r in conn.execute(query)]

        now = now_ms()
        return [_listing(row, now) for row in self.tracking.read(select)]

    def expire(self, name: str, at_ms: int) -> dict:
        """Makes the token stop working at `at_ms` (epoch milliseconds), or keeps its earlier expiry: a
        token is never given a longer life here. Returns its listing; RESOURCE_DOES_NOT_EXIST when absent."""

        def update(conn):
            row = conn.execute(sa.select(access_tokens).where(access_tokens.c.name == name)).first()
            if row is None:
                raise not_found(f"No token named '{name}'.")
            row = row._asdict()
            if row["expires_time"] is None or row["expires_time"] > at_ms:
                conn.execute(access_tokens.update().where(access_tokens.c.name == name)
                             .values(expires_time=at_ms))
                row["expires_time"] = at_ms
            return row

        return _listing(self.tracking.write(update), now_ms())

    def revoke(self, name: str) -> None:
        def delete(conn):
            return conn.execute(access_tokens.delete().where(access_tokens.c.name == name)).rowcount

        if not self.tracking.write(delete):
            raise not_found(f"No token named '{name}'.")

    def authenticate(self, token: str) -> str | None:
        """The user a valid, unexpired token belongs to; None for any other string."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        digest = self._hash(token)
        query = sa.select(access_tokens.c.user_name, access_tokens.c.expires_time,
                          access_tokens.c.last_used_time).where(access_tokens.c.token_hash == digest)
        row = self.tracking.read(lambda conn: conn.execute(query).first())
        now = now_ms()
        if row is None or (row.expires_time is not None and row.expires_time <= now):
            return None
        if row.last_used_time is None or now - row.last_used_time >= LAST_USED_RESOLUTION_MS:
            touch = access_tokens.update().where(access_tokens.c.token_hash == digest).values(
                last_used_time=now)
            self.tracking.write(lambda conn: conn.execute(touch), single_statement=True)
        return row.user_name


def _listing(row: dict, now: int) -> dict:
    expires = row["expires_time"]
    return {"name": row["name"], "user": row["user_name"], "created_time": row["created_time"],
            "expires_time": expires, "last_used_time": row["last_used_time"],
            "status": "expired" if expires is not None and expires <= now else "active"}
