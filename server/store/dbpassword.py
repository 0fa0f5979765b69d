"""The backend store's password from a file the process watches (`--backend-store-password-file`).

A Kubernetes Secret mount or the file `runyard rotate db-password` writes (0600, replaced atomically)
holds the password; the URI holds none. Every NEW database connection uses the file's current content
(one trailing newline stripped). The file is re-read only when its stat signature (inode, size, mtime_ns)
changes, and after every authentication failure.

Rotation without failed requests, whichever is changed first:

- The last password that worked is kept in memory. A new connection the database refuses for
  authentication (PostgreSQL 28P01/28000, MySQL 1045, SQL Server 18456) is retried with the file's
  content read again and with that last good password. File first, then ALTER: the old password still
  works until the ALTER. While the file's content is refused, new connections try the last good password
  first and the file's content again at most every RETRY_FILE_S, so the window does not cost a failed
  login per connection.
- ALTER first, then the file: no password we know works until the file changes. A new connection refused
  with both waits up to RUNYARD_DB_PASSWORD_WAIT_S (default 10 s) for the file to change and connects
  with its new content as soon as it does; it also tries every password it knows again each RETRY_FILE_S
  (the ALTER may have landed between two attempts of ours). Only when some password has worked in this
  process: at start a wrong password fails at once. When the wait runs out the error is the database's,
  and new connections fail at once until the file changes or a connection gets in.
- Pooled connections are kept (PostgreSQL and MariaDB keep sessions across a password change) but
  recycled at their next checkout when they were not opened with the file's current content: as soon as
  that content is known to work, or untested, or (while refused) once per RETRY_FILE_S. So after a
  rotation every connection soon uses the new password, and the old one is no longer in use.

Nothing here logs, raises or stores the password outside this process's memory.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import weakref

from server.errors import RunyardError

log = logging.getLogger("runyard.store")

PASSWORD_FILE_ENV = "RUNYARD_BACKEND_STORE_PASSWORD_FILE"
PASSWORD_WAIT_ENV = "RUNYARD_DB_PASSWORD_WAIT_S"
FLAG = "--backend-store-password-file"
DEFAULT_WAIT_S = 10.0
RETRY_FILE_S = 1.0  # while the database refuses the file's content, try it again at most this often
STAT_INTERVAL_S = 0.5  # checkouts look at the file's stat signature at most this often
_POLL_S = 0.05  # how often a connection waiting for the file to change looks at it

_GENERATION = "runyard.password_generation"  # connection.info keys
_FALLBACK = "runyard.password_fallback"
_USED = "runyard.password_checked_out"
_PG_AUTH_SQLSTATES = ("28P01", "28000")
_MYSQL_AUTH_ERRORS = (1045,)
_MSSQL_AUTH_ERRORS = (18456,)
_AUTH_TEXTS = ("password authentication failed", "no password supplied", "login failed for user")
_SENTINEL = "\x00runyard-password\x00"


def _strip_newline(text: str) -> str:
    """One trailing newline (\\n or \\r\\n) off, as `toolkit.secrets` reads files: `echo pw > file` works."""
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    return text


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return _strip_newline(handle.read())


def password_file_problem(path: str) -> str | None:
    """What is wrong with `path` as a password file (never its content), or None."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return "is not a file"
    try:
        password = _read(path)
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    if not password:
        return "is empty"
    return None


def check_password_file(uri: str, path: str) -> str:
    """Start-up check of `--backend-store-password-file`: a readable, non-empty file, for a database
    server URI that holds no password itself. Returns the absolute path (worker processes may start
    elsewhere); raises RunyardError naming the flag, never the content."""
    from sqlalchemy.engine import make_url

    from server.store.uri import embedded_folder

    if not path or not path.strip():
        raise RunyardError(f"{FLAG} needs a file", "INVALID_PARAMETER_VALUE")
    path = os.path.abspath(os.path.expanduser(path))
    try:
        url = make_url(uri) if embedded_folder(uri) is None else None
    except Exception as exc:  # noqa: BLE001 - the message must not hold the URI (its password)
        raise RunyardError(f"Invalid backend store URI: {exc.__class__.__name__}", "INVALID_STATE") from None
    if url is None or url.get_backend_name() == "sqlite":
        raise RunyardError(f"{FLAG} is for database servers; the SQLite backend store has no password",
                           "INVALID_PARAMETER_VALUE")
    if url.password is not None:
        raise RunyardError(f"--backend-store-uri holds a password and {FLAG} names another: give the "
                           "password one way only (remove it from the URI)", "INVALID_PARAMETER_VALUE")
    problem = password_file_problem(path)
    if problem:
        raise RunyardError(f"{FLAG} {path}: {problem}", "INVALID_PARAMETER_VALUE")
    return path


def warn_if_exposed(path: str) -> bool:
    """Logs a warning when group or others may read the file; True when it did."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return False
    if mode & 0o044:
        log.warning("%s %s can be read by %s (mode %04o); chmod 600 it (Kubernetes: defaultMode: 0400)",
                    FLAG, path, "others" if mode & 0o004 else "its group", mode)
        return True
    return False


def password_file_from_env(url, environ: dict | None = None) -> str | None:
    """RUNYARD_BACKEND_STORE_PASSWORD_FILE, for the toolkit: applies to a database server URL that holds
    no password (a password in the URI wins)."""
    path = (environ if environ is not None else os.environ).get(PASSWORD_FILE_ENV) or None
    if path is None or url.password is not None or url.get_backend_name() == "sqlite":
        return None
    return os.path.abspath(os.path.expanduser(path))


def is_auth_failure(exc: BaseException) -> bool:
    """The database refused the credentials (not: unreachable, too many connections, no such database)."""
    if getattr(exc, "sqlstate", None) in _PG_AUTH_SQLSTATES:
        return True
    args = getattr(exc, "args", ())
    code = args[0] if args else None
    if isinstance(code, tuple) and code:  # pymssql: ((18456, b'Login failed ...'),)
        code = code[0]
    if isinstance(code, int) and code in _MYSQL_AUTH_ERRORS + _MSSQL_AUTH_ERRORS:
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _AUTH_TEXTS)


class WatchedPassword:
    """One password file, shared by every engine of the process that uses it (see the module's doc)."""

    def __init__(self, path: str, wait_s: float = DEFAULT_WAIT_S):
        self.path = path
        self.wait_s = wait_s
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._password: str | None = None  # the file's content
        self._generation = 0  # +1 each time the content changes
        self._file_state = "untested"  # of the current content: untested | works | refused
        self._refused_at = 0.0
        self._last_good: str | None = None
        self._good_version = 0  # +1 each time the last good password changes
        self._gave_up: tuple[int, int] | None = None  # (generation, good version) whose wait ran out
        self._waiting = False  # a connection waits for the file to change (since the last success)
        self._logged: set[tuple] = set()  # what was logged already: once per change
        self._unreadable = False
        self._next_stat = 0.0

    # -- the file ------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Re-reads the file when its stat signature changed (`force`: whatever it is). A file that is
        missing, unreadable or empty for a moment (a writer between truncate and write) leaves the last
        content in use; it is read again at the next look."""
        try:
            info = os.stat(self.path)
            signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError as exc:
            self._cannot_read(exc.strerror)
            return
        if signature == self._signature and not force:
            return
        try:
            password = _read(self.path)
        except (OSError, UnicodeDecodeError) as exc:
            self._cannot_read(getattr(exc, "strerror", None) or "not UTF-8 text")
            return
        if not password:
            self._cannot_read("empty")
            return
        with self._lock:
            self._signature = signature
            if self._unreadable:
                self._unreadable = False
                log.info("backend store password file %s is readable again", self.path)
            if password != self._password:
                first = self._password is None
                self._password = password
                self._generation += 1
                self._file_state = "works" if password == self._last_good else "untested"
                if not first:
                    log.info("backend store password file %s changed (version %d): new connections use "
                             "it; pooled ones are replaced as they are next used", self.path,
                             self._generation)

    def _cannot_read(self, reason: str | None) -> None:
        with self._lock:
            self._signature = None  # look again next time
            first, self._unreadable = not self._unreadable, True
        if first:
            level = logging.ERROR if self._password is None else logging.WARNING
            log.log(level, "cannot read the backend store password file %s (%s)%s", self.path, reason,
                    "" if self._password is None else "; new connections go on with its last content")

    def _look(self) -> None:
        now = time.monotonic()
        if now >= self._next_stat:
            self._next_stat = now + STAT_INTERVAL_S
            self.refresh()

    def preferred(self) -> str | None:
        """The password a tool (pg_dump, mysqldump) should use: the last that worked, else the file's."""
        self.refresh()
        with self._lock:
            return self._last_good if self._last_good is not None else self._password

    def secrets(self) -> tuple[str, ...]:
        """The passwords held in memory, for scrubbing error messages."""
        with self._lock:
            return tuple(p for p in {self._password, self._last_good} if p)

    # -- new connections (SQLAlchemy's do_connect) ----------------------------------------------------

    def _order(self) -> list[str]:
        with self._lock:
            file_pw, good = self._password, self._last_good
            recently_refused = (self._file_state == "refused"
                                and time.monotonic() - self._refused_at < RETRY_FILE_S)
        order = [good, file_pw] if recently_refused else [file_pw, good]
        return [p for i, p in enumerate(order) if p is not None and p not in order[:i]]

    def connect(self, key: str, dialect, record, cargs: list, cparams: dict):
        self.refresh()
        candidates = self._order()
        if not candidates:
            raise RunyardError(f"cannot read the backend store password file {self.path}",
                               "TEMPORARILY_UNAVAILABLE")
        tried: list[str] = []
        errors: list[BaseException] = []
        while candidates:
            password = candidates.pop(0)
            tried.append(password)
            connection = self._attempt(key, dialect, record, cargs, cparams, password, errors)
            if connection is not None:
                return connection
            self.refresh(force=True)  # the file may have changed since (same size and mtime even)
            candidates = [p for p in self._order() if p not in tried]
        connection = self._wait(key, dialect, record, cargs, cparams, tried, errors)
        if connection is not None:
            return connection
        raise errors[0]  # the database's own refusal of the file's (or the last good) password

    def _attempt(self, key, dialect, record, cargs, cparams, password: str, errors: list):
        """A new connection with `password`; None (and the error kept) when it is refused."""
        try:
            connection = dialect.connect(*cargs, **{**cparams, key: password})
        except Exception as exc:  # noqa: BLE001 - not an authentication failure: raised as it is
            if not is_auth_failure(exc):
                raise
            errors.append(exc)
            self._refused(password)
            return None
        self._worked(password, record)
        return connection

    def _wait(self, key, dialect, record, cargs, cparams, tried: list[str], errors: list):
        """Every password known was refused: a rotation may have changed the database first (or between
        two attempts of ours). Waits for the file to change, trying its content at once when it does, and
        every password known again every RETRY_FILE_S."""
        with self._lock:
            episode = (self._generation, self._good_version)
            if self._last_good is None or self._gave_up == episode or self.wait_s <= 0:
                return None
            first, self._waiting = not self._waiting, True  # logged again after a connection got in
        if first:
            log.warning("the database refuses the password in %s and the previous one; new connections "
                        "wait up to %g s for the file to change", self.path, self.wait_s)
        now = time.monotonic()
        deadline, retry_at = now + self.wait_s, now + RETRY_FILE_S
        while time.monotonic() < deadline:
            time.sleep(_POLL_S)
            self.refresh()
            with self._lock:
                if self._gave_up == episode:
                    return None
                known = [self._password, self._last_good]
            if time.monotonic() >= retry_at:
                retry_at = time.monotonic() + RETRY_FILE_S
                candidates = [p for i, p in enumerate(known) if p is not None and p not in known[:i]]
            else:
                candidates = [p for p in known[:1] if p is not None and p not in tried]
            for password in candidates:
                tried.append(password)
                connection = self._attempt(key, dialect, record, cargs, cparams, password, errors)
                if connection is not None:
                    return connection
        with self._lock:
            self._gave_up = episode
            first = (episode, "gave up") not in self._logged
            self._logged.add((episode, "gave up"))
        if first:
            log.error("the database refuses the password in %s and the previous one; new connections fail "
                      "until the file changes", self.path)
        return None

    def _refused(self, password: str) -> None:
        with self._lock:
            if password == self._password:
                self._file_state = "refused"
                self._refused_at = time.monotonic()

    def _worked(self, password: str, record) -> None:
        with self._lock:
            from_file = password == self._password
            if from_file:
                self._file_state = "works"
            if password != self._last_good:
                self._last_good = password
                self._good_version += 1
            self._gave_up = None
            self._waiting = False
            generation = self._generation
            event = (generation, "file" if from_file else "previous")
            first = event not in self._logged
            self._logged.add(event)
        if record is not None:
            record.info[_GENERATION] = generation
            record.info[_FALLBACK] = not from_file
            record.info[_USED] = False
        if not first:
            return
        if from_file:
            log.info("backend store: connected with the password from %s (version %d)", self.path,
                     generation)
        else:
            log.warning("backend store: the database refuses the password in %s (version %d) but still "
                        "accepts the previous one; connected with that, and trying the file's again",
                        self.path, generation)

    # -- pooled connections (checkout) ----------------------------------------------------------------

    def checkout(self, dbapi_connection, record, proxy) -> None:
        info = record.info
        if not info.get(_USED, True):  # just opened, with the best password known: never recycled now
            info[_USED] = True
            return
        self._look()
        if info.get(_GENERATION) == self._generation and not info.get(_FALLBACK):
            return
        with self._lock:
            state, refused_at = self._file_state, self._refused_at
        if state == "refused" and time.monotonic() - refused_at < RETRY_FILE_S:
            return  # keep a connection that works while the file's password does not (yet)
        from sqlalchemy.exc import DisconnectionError

        # The pool discards this connection and opens a new one for the same checkout.
        raise DisconnectionError("opened before the backend store password changed")


_WATCHED: dict[str, WatchedPassword] = {}
_WATCHED_LOCK = threading.Lock()
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def watched(path: str) -> WatchedPassword:
    """The process's one WatchedPassword for `path`: engines on the same file share what worked."""
    path = os.path.abspath(path)
    with _WATCHED_LOCK:
        found = _WATCHED.get(path)
        if found is None:
            found = _WATCHED[path] = WatchedPassword(path, _wait_s())
        return found


def _wait_s() -> float:
    raw = os.environ.get(PASSWORD_WAIT_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_WAIT_S
    except ValueError:
        raise RunyardError(f"{PASSWORD_WAIT_ENV} must be a number of seconds", "INVALID_PARAMETER_VALUE"
                           ) from None


class _Hooks:
    def __init__(self, password: WatchedPassword, key: str):
        self.password = password
        self.key = key

    def do_connect(self, dialect, record, cargs, cparams):
        return self.password.connect(self.key, dialect, record, cargs, cparams)


def _password_key(engine, url) -> str:
    """The driver's keyword for the password (psycopg, PyMySQL, pymssql: `password`)."""
    _, params = engine.dialect.create_connect_args(url.set(password=_SENTINEL))
    return next((k for k, v in params.items() if v == _SENTINEL), "password")


def attach(engine, url, path: str) -> None:
    """Makes `engine` connect with the password in `path` and recycle connections when it changes."""
    from sqlalchemy import event

    password = watched(path)
    password.refresh()
    hooks = _Hooks(password, _password_key(engine, url))
    event.listen(engine, "do_connect", hooks.do_connect)
    event.listen(engine, "checkout", password.checkout)
    _ENGINES[engine] = password


def for_engine(engine) -> WatchedPassword | None:
    return _ENGINES.get(engine)


def tool_password(url, engine=None) -> str | None:
    """The password to hand a tool (pg_dump, mysqldump, psql) for `url`: the URI's, else that of the
    engine's password file, else RUNYARD_BACKEND_STORE_PASSWORD_FILE's."""
    if url.password is not None:
        return str(url.password)
    source = for_engine(engine) if engine is not None else None
    if source is None:
        path = password_file_from_env(url)
        source = watched(path) if path else None
    return source.preferred() if source is not None else None


def secrets_of(engine) -> tuple[str, ...]:
    """Every password `engine` may connect with (its URL's, its password file's), to scrub messages."""
    url_password = getattr(getattr(engine, "url", None), "password", None)
    source = for_engine(engine)
    found = source.secrets() if source is not None else ()
    return tuple(p for p in (url_password, *found) if p)

