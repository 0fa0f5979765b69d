"""`runyard rotate db-password`: a new password for the backend store's database user, without downtime.

`uri` is the backend store URI without its password (postgresql://user@host/db, mysql://user@host/db,
MariaDB included); `secret` is the `toolkit.secrets` reference the servers read the password from (the
file they get as --backend-store-password-file, or the Secrets Manager entry / Kubernetes Secret that
feeds it: keeping those in sync is the deployment's business).

PostgreSQL and MariaDB/MySQL give a user one password at a time, so there is no overlap on the database
side: it comes from the servers. They read the password from the secret for every new connection and,
when it is refused, fall back to the last password that worked. A single database user is therefore
enough: between the secret's change and the database's, the servers keep connecting with the old
password; right after, with the new one.

Steps (each reported to `progress`; nothing reported, returned or raised ever holds a password):

1. read the current password from the secret and connect with it (the database must ask for it: a
   server that trusts the connection could not check the rotation). Refused: nothing is changed;
2. generate a new password (`secrets.token_urlsafe(32)`);
3. write it to the secret;
4. change it in the database for the URI's own user, without the plaintext ever reaching the server (it
   could end up in statement logs): PostgreSQL gets `ALTER ROLE … PASSWORD '<SCRAM-SHA-256 verifier>'`
   computed by libpq on this side; MariaDB `SET PASSWORD = '<mysql_native_password hash>'`, which any
   user may run on itself (measured on MariaDB 10.11: `ALTER USER CURRENT_USER() IDENTIFIED BY PASSWORD
   …` is refused without the CREATE USER privilege, and with it succeeds without changing anything);
   MySQL `ALTER USER CURRENT_USER() IDENTIFIED WITH mysql_native_password AS …` (MySQL reads `SET
   PASSWORD = '…'` as plaintext; not tested here: there is no MySQL server in the test setup, but step 5
   catches a change that did not take);
5. verify: a new connection with the new password works, one with the old password is refused, and
   each of `ready_urls` answers 200 at /ready (polled for `ready_timeout_s`).

A failure after step 3 (or an interruption) rolls back: the old password is set again in the database
(if the change had been attempted), the old value goes back to the secret, and a connection with it is
checked; then RunyardError says at which step it failed. Should the database's rollback fail, the secret
is left holding the password the database has, so the servers keep working.

Two rotations of the same user cannot run at once: the first holds a lock in the database.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence

import requests
import sqlalchemy as sa

from server.errors import RunyardError
from server.store.uri import redact, sqlalchemy_url
from toolkit.db import SILENT, Progress
from toolkit.secrets import Secret, open_secret

STEPS = {
    1: "connect with the current password",
    2: "generate a new password",
    3: "write the new password to the secret",
    4: "change the password in the database",
    5: "verify",
}
DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
CONNECT_TIMEOUT_S = 10
READY_TIMEOUT_S = 15.0
LOCK_NAME = "runyard.rotate-db-password"


def _fail(message: str, code: str = "INVALID_STATE") -> RunyardError:
    return RunyardError(message, code)


def _new_password() -> str:
    return secrets.token_urlsafe(32)


class _Refused(Exception):
    """The database refused the password (not: could not be reached)."""


class _Database:
    """One database user, reached with the URI's connection options and a password given per call."""

    def __init__(self, uri: str):
        try:
            has_password = sa.engine.make_url(uri).password is not None
        except Exception:
            has_password = False
        if has_password:
            raise _fail(f"Give the backend store URI without its password ({redact(uri)}): the password "
                        "comes from the secret", "INVALID_PARAMETER_VALUE")
        url = sqlalchemy_url(uri)
        backend = url.get_backend_name()
        if backend not in DRIVERS:
            raise _fail(f"Rotating the password works for PostgreSQL and MariaDB/MySQL databases, not "
                        f"{backend}", "INVALID_PARAMETER_VALUE")
        if url.get_driver_name() != DRIVERS[backend]:
            raise _fail(f"Rotating the password needs the {DRIVERS[backend]} driver (write {backend}:// "
                        f"without +{url.get_driver_name()})", "INVALID_PARAMETER_VALUE")
        self.url = url
        self.postgres = backend == "postgresql"
        self.dialect = sa.create_engine(url, poolclass=sa.pool.NullPool).dialect  # connects to nothing
        self.shown = redact(uri)
        self.method = ""

    def connect(self, password: str):
        """A DBAPI connection in autocommit; raises _Refused when the password is refused."""
        cargs, cparams = self.dialect.create_connect_args(self.url.set(password=password))
        cparams.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        try:
            conn = self.dialect.loaded_dbapi.connect(*cargs, **cparams)
        except Exception as exc:
            if self._refused(exc):
                raise _Refused(_reason(exc)) from None
            raise
        if self.postgres:
            conn.autocommit = True
        else:
            conn.autocommit(True)
        return conn

    def _refused(self, exc: Exception) -> bool:
        if self.postgres:
            # The server asked for the password and then closed the connection: it refused it.
            pgconn = getattr(exc, "pgconn", None)
            return pgconn is not None and bool(pgconn.used_password)
        return bool(getattr(exc, "args", None)) and exc.args[0] == 1045  # ER_ACCESS_DENIED_ERROR

    def _one(self, conn, query: str, params: tuple = ()):
        if self.postgres:
            return conn.execute(query, params).fetchone()[0]
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchone()[0]

    def checks_passwords(self, conn) -> bool:
        """False when the server let us in without asking for the password (trust, peer, …)."""
        return bool(conn.pgconn.used_password) if self.postgres else True

    def user(self, conn) -> str:
        return self._one(conn, "SELECT session_user" if self.postgres else "SELECT CURRENT_USER()")

    def lock(self, conn, user: str) -> bool:
        """A lock for this user's rotation, held as long as `conn` is open."""
        name = f"{LOCK_NAME}:{user}"
        if self.postgres:
            return bool(self._one(conn, "SELECT pg_try_advisory_lock(hashtext(%s))", (name,)))
        return self._one(conn, "SELECT GET_LOCK(%s, 0)", (name[:64],)) == 1

    def set_password(self, conn, user: str, password: str) -> None:
        """Sets `user`'s password over `conn`, sending only a hash of it."""
        if self.postgres:
            from psycopg import sql

            verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256")
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user),
                                                                    sql.Literal(verifier.decode())))
            self.method = "ALTER ROLE … PASSWORD '<SCRAM-SHA-256 verifier>'"
            return
        native = "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()
        with conn.cursor() as cur:
            if "mariadb" in str(self._one(conn, "SELECT VERSION()")).lower():
                cur.execute("SET PASSWORD = %s", (native,))  # one's own password: no privilege needed
                self.method = "SET PASSWORD = '<mysql_native_password hash>'"
            else:
                cur.execute("ALTER USER CURRENT_USER() IDENTIFIED WITH mysql_native_password AS %s",
                            (native,))
                self.method = "ALTER USER CURRENT_USER() IDENTIFIED WITH mysql_native_password AS '<hash>'"

def _reason(exc: BaseException, *passwords: str | None) -> str:
    """The error's own words on one line, scrubbed of the passwords should a driver echo one."""
    if isinstance(exc, RunyardError):
        text = exc.message
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    for password in passwords:
        if password:
            text = text.replace(password, "***")
    return text


def _close(conn) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass


def _wait_ready(urls: Sequence[str], timeout_s: float) -> list[dict]:
    checked = []
    for url in urls:
        base = url.rstrip("/")
        deadline, last = time.monotonic() + timeout_s, "no answer"
        while True:
            try:
                answer = requests.get(f"{base}/ready", timeout=min(10.0, max(timeout_s, 1.0)))
                if answer.status_code == 200:
                    break
                last = f"HTTP {answer.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            if time.monotonic() >= deadline:
                raise _fail(f"{redact(base)}/ready did not answer 200 within {timeout_s:g} s ({last})")
            time.sleep(0.25)
        checked.append({"url": redact(base), "ready": True})
    return checked


def rotate_db_password(uri: str, secret: str, ready_urls: Sequence[str] = (),
                       progress: Progress | None = None, ready_timeout_s: float = READY_TIMEOUT_S) -> dict:
    """Gives the URI's database user a new password, kept in `secret` (see the module's docstring).
    Returns a report without any password; raises RunyardError, after rolling back, on failure."""
    progress = progress or SILENT
    db = _Database(uri)
    store = open_secret(secret)
    started = time.monotonic()

    progress.stage(f"Step 1/5: reading the password from {store.ref} and connecting to {db.shown}")
    old = store.read()
    if not old:
        raise _fail(f"{store.ref} holds no password: nothing to rotate (nothing was changed)")
    try:
        admin = db.connect(old)
    except _Refused as exc:
        raise _fail(f"{db.shown} refuses the password in {store.ref} ({_reason(exc, old)}); nothing was "
                    "changed") from None
    except Exception as exc:
        raise _fail(f"Cannot connect to {db.shown} ({_reason(exc, old)}); nothing was changed") from None
    try:
        return _rotate(db, store, admin, old, ready_urls, ready_timeout_s, progress, started)
    finally:
        _close(admin)  # also releases the rotation lock


def _rotate(db: _Database, store: Secret, admin, old: str, ready_urls: Sequence[str], ready_timeout_s: float,
            progress: Progress, started: float) -> dict:
    try:
        if not db.checks_passwords(admin):
            raise _fail(f"{db.shown} let us in without asking for the password (trust or peer "
                        "authentication): a rotation could not be checked; nothing was changed")
        user = db.user(admin)
        if not db.lock(admin, user):
            raise _fail(f"Another rotation of {user}'s password is running; nothing was changed")
        if store.read() != old:
            raise _fail(f"{store.ref} changed while the rotation started; nothing was changed: run it again")
    except RunyardError:
        raise
    except Exception as exc:
        raise _fail(f"Cannot use {db.shown} ({_reason(exc, old)}); nothing was changed") from None

    progress.stage("Step 2/5: generating a new password")
    new = _new_password()

    step, altered = 3, False
    try:
        progress.stage(f"Step 3/5: writing the new password to {store.ref}")
        store.write(new)
        step, altered = 4, True  # from here the database may hold the new password, whatever happens
        progress.stage(f"Step 4/5: changing the password of {user} in the database")
        db.set_password(admin, user, new)
        step = 5
        progress.stage("Step 5/5: checking the new password works and the old one is refused"
                       + (f", then {len(ready_urls)} server(s)' /ready" if ready_urls else ""))
        _verify(db, old, new)
        servers = _wait_ready(ready_urls, ready_timeout_s)
    except (Exception, KeyboardInterrupt) as exc:
        reason = _reason(exc, old, new)
        progress.stage(f"Rotation failed at step {step}; rolling back")
        outcome = _roll_back(db, store, admin, user, old, new, altered)
        raise _fail(f"Rotation failed at step {step} ({STEPS[step]}): {reason}; {outcome}") from None
    return {
        "backend": db.shown,
        "user": user,
        "secret": store.ref,
        "method": db.method,
        "steps": [{"step": n, "name": name, "ok": True} for n, name in STEPS.items()],
        "servers_checked": servers,
        "rotated": True,
        "duration_s": round(time.monotonic() - started, 3),
    }


def _verify(db: _Database, old: str, new: str) -> None:
    try:
        conn = db.connect(new)
    except _Refused as exc:
        raise _fail(f"the database refuses the new password ({exc})") from None
    _close(conn)
    try:
        conn = db.connect(old)
    except _Refused:
        return
    _close(conn)
    raise _fail("the database still accepts the old password")


def _roll_back(db: _Database, store: Secret, admin, user: str, old: str, new: str, altered: bool) -> str:
    """Puts the old password back in the database, then in the secret; returns what happened, for the
    message. If the database keeps the new password, so does the secret: the servers need it."""
    if altered:
        conn, owned = admin, False
        try:
            try:
                db.set_password(conn, user, old)
            except Exception:  # the rotation's connection may have died with the failure: a new one
                conn, owned = _connect_any(db, new, old), True
                db.set_password(conn, user, old)
        except Exception as exc:
            return _half_rolled_back(db, store, old, new, _reason(exc, old, new))
        finally:
            if owned:
                _close(conn)
    try:
        if store.read() != old:
            store.write(old)
    except Exception as exc:
        return (f"rolling back failed: the database has the old password again but {store.ref} could not "
                f"be given it back ({_reason(exc, old, new)}); restore it there by hand")
    try:
        _close(db.connect(old))
    except Exception as exc:
        return (f"rolled back the database and {store.ref}, but connecting with the old password then failed "
                f"({_reason(exc, old, new)})")
    return f"rolled back: the database and {store.ref} hold the previous password again"


def _connect_any(db: _Database, *passwords: str):
    last: Exception | None = None
    for password in passwords:
        try:
            return db.connect(password)
        except Exception as exc:
            last = exc
    raise last  # type: ignore[misc]


def _half_rolled_back(db: _Database, store: Secret, old: str, new: str, reason: str) -> str:
    """The database could not get the old password back: make sure the secret holds what it has."""
    for password in (new, old):
        try:
            _close(db.connect(password))
        except Exception:
            continue
        holds = "the new" if password == new else "the old"
        try:
            if store.read() != password:
                store.write(password)
        except Exception as exc:
            return (f"rolling back failed: the database kept {holds} password ({reason}) and {store.ref} "
                    f"could not be updated to match ({_reason(exc, old, new)}); fix it by hand")
        return (f"rolling back the database failed ({reason}); it has {holds} password, which {store.ref} "
                "holds, so the servers keep working: run the rotation again")
    return (f"rolling back failed: the database's password could not be set back ({reason}) and neither "
            f"password connects now; {store.ref} holds the new one")
