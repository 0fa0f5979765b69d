"""Basic-auth passwords from an htpasswd file (bcrypt), checked by the server for NGINX's auth_request.

Why the server and not NGINX's auth_basic: NGINX re-hashes the password on every request inside its event
loop, so a proper bcrypt cost (a quarter of a second) would stall every connection of that worker. Here
the hash runs on a worker thread, once per credential: a success is remembered (under a keyed digest,
never the password) until the file changes or the entry ages out. Editing the file (`runyard users …`)
replaces it, so a changed or removed password stops working on the next request, without a reload.

A user may have several bcrypt lines and any one of them lets the user in: that is how `runyard rotate
htpasswd` keeps the old and the new password working during the overlap. (NGINX's own auth_basic would
consult the first line only; nothing in Runyard relies on that.)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time

import bcrypt

from server.errors import invalid

log = logging.getLogger("runyard.auth")

REMEMBER_S = 300.0
MAX_REMEMBERED = 10_000
_BCRYPT = (b"$2a$", b"$2b$", b"$2y$")


class PasswordFile:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._hashes: dict[str, list[bytes]] = {}
        self._remembered: dict[bytes, float] = {}
        self._key = secrets.token_bytes(32)
        self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
            with open(self.path, "rb") as f:
                content = f.read()
        except OSError as exc:
            raise invalid(f"Cannot read the htpasswd file {self.path}: {exc.strerror}") from None
        hashes: dict[str, list[bytes]] = {}
        skipped = 0
        for line in content.splitlines():
            name, sep, hashed = line.strip().partition(b":")
            if not sep or name.startswith(b"#"):
                continue
            if hashed.startswith(_BCRYPT):
                hashes.setdefault(name.decode("utf-8", "replace"), []).append(hashed)  # any one may match
            else:
                skipped += 1
        if skipped:
            log.warning("%s: %d line(s) without a bcrypt hash ignored; set them again with "
                        "`runyard users passwd`", self.path, skipped)
        self._hashes, self._remembered = hashes, {}
        self._signature = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            signature = None
        if signature != self._signature:
            with self._lock:
                try:
                    self._load()
                except Exception as exc:  # keep serving with what we had; say why once per change
                    log.error("%s", getattr(exc, "message", exc))
                    self._signature = signature

    def verify(self, user: str, password: str) -> bool:
        self._refresh()
        hashes, remembered = self._hashes, self._remembered
        digest = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        expiry = remembered.get(digest)
        if expiry is not None and expiry > time.monotonic():
            return True
        candidates = hashes.get(user)
        secret = password.encode()
        if not candidates or len(secret) > 72:
            # An unknown user costs a hash of the same cost too: response times do not tell which exist.
            _matches(b"", next(iter(hashes.values()), [b""])[0])
            return False
        if not any(_matches(secret, hashed) for hashed in candidates):
            return False
        if len(remembered) >= MAX_REMEMBERED:
            remembered.clear()
        remembered[digest] = time.monotonic() + REMEMBER_S
        return True


def _matches(secret: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(secret, hashed)
    except ValueError:  # a damaged hash in the file
        return False
