"""`runyard rotate token|htpasswd`: a new bearer token or basic-auth password, handed over with an overlap.

Both follow the same order, so that clients never see a credential that does not work, and a failure leaves
everything as it was:

1. make the new credential next to the old one (a successor token for the same user; another htpasswd line
   for the same user, so both passwords work);
2. verify it: the server-side check itself (the store authenticates the token; the htpasswd file accepts
   the password) and, with `check_url`, an authenticated API read through NGINX answering 200;
3. write it to the secret `to` (a `toolkit.secrets` reference: a 0600 file, an AWS Secrets Manager secret)
   and read it back; without `to` it is returned (key "token" / "password") for the CLI to print once;
4. retire the old one after the overlap: a token gets `expires = now + overlap` (0 revokes it at once; an
   earlier expiry is kept); the old password lines are removed once the command has waited `overlap_s`.

A failure in steps 1-3 undoes them: the successor token is revoked (the old one is untouched), the new
htpasswd line is removed, and the secret gets back the value it held. Clients that re-read the secret
when they get a 401 (the behaviour `runyard` expects of them) move over without a failed request.

Token names: the successor of `<base>` or `<base>-<stamp>` is `<base>-<UTC yyyymmddHHMMSS>` (`-2`, `-3`…
when that name is taken), so the base stays recognisable across rotations and the names sort by age.
`name` may be the base name: the newest active token of that family is rotated, which is what a periodic
job (`runyard rotate token ci-pipeline --overlap 1h --to …`) needs.

Reports never hold a token or password, except the "token"/"password" key described in step 3, which the
CLI must print alone and only once. No error message holds one either.
"""

from __future__ import annotations

import os
import re
import secrets
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime

import requests
from requests.auth import AuthBase, HTTPBasicAuth
from urllib3.exceptions import InsecureRequestWarning

from server.errors import RunyardError, invalid
from server.store.tracking import now_ms
from toolkit import health, htpasswd, tokens
from toolkit.db import SILENT, Progress
from toolkit.secrets import Secret, open_secret

CHECK_TIMEOUT_S = 30.0
GENERATED_PASSWORD_BYTES = 24  # 32 URL-safe characters: 192 bits, far within bcrypt's 72 bytes
_STAMP = re.compile(r"-\d{14}(?:-\d{1,4})?$")
_NAME_MAX = 255
_OVERLAP = re.compile(r"(\d+)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_API_READ = "/api/2.0/mlflow/experiments/search"


def _fail(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_STATE")


def parse_overlap(text: str) -> float:
    """'10m', '1h', '90s', '2d', '0' -> seconds (0 allowed: retire the old credential at once)."""
    match = _OVERLAP.fullmatch(str(text).strip().lower())
    if not match:
        raise invalid(f"Invalid overlap {text!r}: use a number followed by s, m, h, d or w (e.g. 10m), "
                      "or 0 to retire the old credential at once.")
    return float(int(match.group(1)) * _UNIT_S[match.group(2)])


def _overlap_s(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        raise invalid(f"Invalid overlap {value!r}: a number of seconds, 0 or more.")
    return float(value)


# --- verification through NGINX ------------------------------------------------------------------------

class _ApiCheck:
    """An authenticated API read (`experiments/search`) at `url`, as an MLflow client makes it. TLS
    settings come from MLflow's variables (MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_CLIENT_CERT_PATH), as for `runyard health`; the credential is the one being checked."""

    TLS_ENV = ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS",
               "MLFLOW_TRACKING_CLIENT_CERT_PATH")

    def __init__(self, url: str):
        if health.strip_userinfo(url) != url.strip():
            raise invalid("--check-url: put no credentials in the URL; the new credential is what gets "
                          "checked.")
        env = {name: os.environ[name] for name in self.TLS_ENV if name in os.environ}
        try:
            self.settings = health._settings(url, env)
        except health._ConfigError as exc:
            raise invalid(f"--check-url: {exc}") from None
        self.url = self.settings.base_url

    def status(self, auth: AuthBase) -> int:
        """The HTTP status of the read; RunyardError when no answer came (connection, TLS, timeout)."""
        with requests.Session() as session, warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRequestWarning)  # MLFLOW_TRACKING_INSECURE_TLS: asked for
            try:
                answer = session.get(self.url + _API_READ, params={"max_results": 1}, auth=auth,
                                     timeout=CHECK_TIMEOUT_S, verify=self.settings.verify,
                                     cert=self.settings.cert)
            except (requests.RequestException, OSError, ValueError) as exc:
                raise _fail(f"{self.url}: {health._describe(exc, CHECK_TIMEOUT_S)}") from None
            return answer.status_code

    def expect(self, auth: AuthBase, what: str, hint: str = "") -> None:
        status = self.status(auth)
        if status != 200:
            raise _fail(f"an authenticated read at {self.url} with {what} answered HTTP {status}, not 200"
                        + (f" ({hint})" if hint and status == 401 else ""))


# --- the secret ----------------------------------------------------------------------------------------

class _Handover:
    """Writes the new value to the secret and reads it back; `undo` puts the old value back."""

    def __init__(self, secret: Secret | None):
        self.secret = secret
        self.previous: str | None = None
        self.touched = False

    @property
    def ref(self) -> str | None:
        return self.secret.ref if self.secret is not None else None

    def write(self, value: str) -> None:
        if self.secret is None:
            return
        self.previous = self.secret.read()
        self.touched = True  # a write that failed half-way may still have changed it
        self.secret.write(value)
        if self.secret.read() != value:
            raise _fail(f"{self.secret.ref} does not hold the new value when read back")

    def undo(self) -> str:
        if self.secret is None or not self.touched:
            return ""
        if self.previous is None:
            try:
                now = self.secret.read()
            except RunyardError:
                now = ""
            if now is None:
                return ""  # it did not exist and still does not
            return f"; {self.secret.ref} did not exist before and may now hold the withdrawn credential"
        try:
            self.secret.write(self.previous)
        except RunyardError as exc:
            return f"; {self.secret.ref} could NOT be given its previous value back ({exc.message})"
        return f"; {self.secret.ref} holds its previous value again"


def _rolled_back(exc: BaseException, note: str) -> BaseException:
    """`exc` with what the rollback did appended (RunyardError), or unchanged (anything else)."""
    if isinstance(exc, RunyardError):
        return RunyardError(f"{exc.message}. Rolled back: {note}", exc.error_code, exc.status)
    return exc


# --- tokens --------------------------------------------------------------------------------------------

def base_name(name: str) -> str:
    """The token's name without the `-<yyyymmddHHMMSS>[-N]` a rotation appended."""
    return _STAMP.sub("", name)


def _successor_name(base: str, taken: set[str], when: datetime) -> str:
    stamp = when.strftime("%Y%m%d%H%M%S")
    if len(base) + 1 + len(stamp) + 5 > _NAME_MAX:
        raise invalid(f"Token name {base!r} is too long to add a rotation stamp to.")
    name, n = f"{base}-{stamp}", 2
    while name in taken:
        name, n = f"{base}-{stamp}-{n}", n + 1
    return name


def _target(listing: list[dict], name: str) -> dict:
    """The token `name` designates: the newest active one of its family (the base name and the names a
    rotation derived from it). An older member named explicitly is refused: rotating it would fork the
    family."""
    base = base_name(name)
    exact = next((t for t in listing if t["name"] == name), None)
    family = [t for t in listing if t["status"] == "active" and base_name(t["name"]) == base]
    if not family:
        if exact is not None:
            raise _fail(f"Token '{name}' has expired; there is nothing to rotate (create a new one with "
                        "`runyard tokens create`).")
        raise RunyardError(f"No token named '{name}'.", "RESOURCE_DOES_NOT_EXIST")
    newest = max(family, key=lambda t: (t["created_time"], t["name"]))
    if name != base and name != newest["name"]:
        raise _fail(f"Token '{name}' has a newer successor, '{newest['name']}': rotate that one (or give "
                    f"the base name '{base}').")
    return newest


def rotate_token(uri: str, name: str, overlap_s: float, to: str | None = None, expires: str | None = None,
                 pepper_file: str | None = None, check_url: str | None = None,
                 progress: Progress = SILENT) -> dict:
    """Replaces the bearer token `name` (or the newest of the family `name` is the base of) by a successor
    for the same user; see the module's docstring for the steps. `expires`: the successor's lifetime as
    `runyard tokens create --expires` takes it (90d, 12h…); default: the lifetime the old token was given
    (none if it had none). Returns the report; with `to` None it also holds the new token under "token"."""
    overlap = _overlap_s(overlap_s)
    check = _ApiCheck(check_url) if check_url else None  # every argument is checked before any change
    handover = _Handover(open_secret(to) if to else None)
    lifetime_ms = tokens.parse_duration(expires) if expires else None

    with tokens.open_store(uri, pepper_file) as store:
        progress.stage(f"Finding token {name}")
        listing = store.list()
        old = _target(listing, name)
        if lifetime_ms is None and old["expires_time"] is not None:
            lifetime_ms = max(old["expires_time"] - old["created_time"], 1000)
        new_name = _successor_name(base_name(old["name"]), {t["name"] for t in listing}, datetime.now(UTC))

        progress.stage(f"Creating {new_name} for user {old['user']}")
        token, created = store.create(new_name, old["user"], lifetime_ms)
        verified = []
        try:
            progress.stage(f"Verifying {new_name}")
            if store.authenticate(token) != old["user"]:
                raise _fail(f"the backend store does not authenticate the new token {new_name}")
            verified.append("store")
            if check is not None:
                check.expect(health.BearerAuth(token), f"the new token {new_name}",
                             "does the server use the same --token-pepper-file and backend store?")
                verified.append("check_url")
            if handover.secret is not None:
                progress.stage(f"Writing {new_name} to {handover.ref}")
                handover.write(token)
                verified.append("secret")
        except BaseException as exc:
            try:
                store.revoke(new_name)
                note = f"the new token {new_name} was revoked, {old['name']} is untouched"
            except Exception:  # the original failure is the one to report
                note = (f"the new token {new_name} could NOT be revoked (run `runyard tokens revoke "
                        f"{new_name}`), {old['name']} is untouched")
            raise _rolled_back(exc, note + handover.undo()) from None

        progress.stage(f"Retiring {old['name']}" + (f" in {overlap:g} s" if overlap else " now"))
        try:
            if overlap == 0:
                store.revoke(old["name"])
                old_expires, revoked = now_ms(), True
            else:
                old_expires = store.expire(old["name"], now_ms() + round(overlap * 1000))["expires_time"]
                revoked = False
        except RunyardError as exc:
            raise RunyardError(f"{new_name} is in place and verified, but {old['name']} could not be "
                               f"retired: {exc.message}; revoke it with `runyard tokens revoke "
                               f"{old['name']}`", exc.error_code) from None

    report = {
        "kind": "token",
        "name": old["name"],
        "successor": new_name,
        "user": old["user"],
        "created_time": created["created_time"],
        "expires_time": created["expires_time"],
        "old_expires_time": old_expires,
        "old_revoked": revoked,
        "overlap_s": overlap,
        "secret": handover.ref,
        "check_url": check.url if check else None,
        "verified": verified,
    }
    if handover.secret is None:
        report["token"] = token  # for the CLI to print once, alone; never part of the printed report
    return report


# --- htpasswd passwords --------------------------------------------------------------------------------

def _wait(overlap: float, progress: Progress) -> None:
    """Sleeps `overlap` seconds; a progress object with `countdown(total_s)` gets the returned callable
    called with the seconds elapsed, about once a second."""
    countdown = getattr(progress, "countdown", None)
    tick: Callable[[float], None] | None = countdown(overlap) if callable(countdown) else None
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < overlap:
        if tick is not None:
            tick(elapsed)
        time.sleep(min(1.0, overlap - elapsed))
    if tick is not None:
        tick(overlap)


def rotate_password(htpasswd_path: str, user: str, overlap_s: float, to: str | None = None,
                    password: str | None = None, check_url: str | None = None,
                    progress: Progress = SILENT) -> dict:
    """Gives `user` a new password (`password`, or a generated one) in the htpasswd file the servers
    check, as an extra line so the old one keeps working for `overlap_s` seconds (the call waits), then
    removes the user's old line(s). See the module's docstring for the steps and the rollback. Returns the
    report; with a generated password and `to` None it also holds the password under "password"."""
    overlap = _overlap_s(overlap_s)
    check = _ApiCheck(check_url) if check_url else None
    handover = _Handover(open_secret(to) if to else None)
    generated = password is None
    new_password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES) if generated else password

    progress.stage(f"Reading the lines of {user} in {htpasswd_path}")
    old_hashes = htpasswd.password_hashes(htpasswd_path, user)
    progress.stage(f"Adding a new password for {user}")
    new_hash = htpasswd.add_password(htpasswd_path, user, new_password)
    verified = []
    try:
        progress.stage("Verifying the new password")
        if not htpasswd.verify(htpasswd_path, user, new_password):
            raise _fail(f"{htpasswd_path} does not accept the new password of {user}")
        verified.append("htpasswd")
        if check is not None:
            check.expect(HTTPBasicAuth(user, new_password), f"the new password of {user}",
                         f"does the server use --htpasswd {htpasswd_path}?")
            verified.append("check_url")
        if handover.secret is not None:
            progress.stage(f"Writing the new password to {handover.ref}")
            handover.write(new_password)
            verified.append("secret")
    except BaseException as exc:
        try:
            htpasswd.remove_hashes(htpasswd_path, user, [new_hash])
            note = f"the new line of {user} was removed, the old password is untouched"
        except Exception:  # the original failure is the one to report
            note = (f"the new line of {user} could NOT be removed from {htpasswd_path}; set the password "
                    "again with `runyard users passwd`")
        raise _rolled_back(exc, note + handover.undo()) from None

    if overlap:
        progress.stage(f"Overlap: both passwords work for {overlap:g} s")
        try:
            _wait(overlap, progress)
        except KeyboardInterrupt:
            where = f" (the new one is in {handover.ref})" if handover.ref else ""
            raise RunyardError(f"Interrupted during the overlap: the old and the new password of {user} both "
                               f"still work{where}. Run the rotation again (--overlap 0 retires every "
                               "other password at once).", "ABORTED") from None

    progress.stage(f"Removing the old password line(s) of {user}")
    removed = htpasswd.remove_hashes(htpasswd_path, user, [h for h in old_hashes if h != new_hash])
    if check is not None:
        try:
            check.expect(HTTPBasicAuth(user, new_password), f"the new password of {user}")
        except RunyardError as exc:
            htpasswd.add_hashes(htpasswd_path, user, old_hashes)
            raise _rolled_back(exc, f"the old line(s) of {user} are back; both passwords work") from None
        verified.append("check_url after removal")

    report = {
        "kind": "htpasswd",
        "htpasswd": htpasswd_path,
        "user": user,
        "overlap_s": overlap,
        "removed_lines": removed,
        "generated": generated,
        "secret": handover.ref,
        "check_url": check.url if check else None,
        "verified": verified,
    }
    if generated and handover.secret is None:
        report["password"] = new_password  # for the CLI to print once, alone
    return report
