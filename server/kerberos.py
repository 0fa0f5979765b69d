"""Kerberos for a long-running process: initiator tickets that stay valid, and SPNEGO for `requests`.

Where the tickets come from (read from the environment when a store is opened):

- RUNYARD_KERBEROS_KEYTAB (+ RUNYARD_KERBEROS_PRINCIPAL, else MLFLOW_KERBEROS_USER, else the keytab's
  first principal): a TGT obtained from the keytab into a private in-memory ticket cache, obtained
  again before it expires, so a server running for weeks keeps working (what `kinit -kt` in a cron job
  would do, without the cron job or a ticket file on disk).
- MLFLOW_KERBEROS_TICKET_CACHE: a ticket cache that someone else keeps fresh (kinit -R, k5start); it is
  read again when the ticket we hold runs low, never written.
- neither: the default ticket cache (KRB5CCNAME).

KRB5_CONFIG, as everywhere in MIT Kerberos, names the krb5.conf to use.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

try:  # the `kerberos` extra: without it simple auth still works, and Tickets says what to install
    import gssapi
    from gssapi.exceptions import GSSError
except ModuleNotFoundError:
    gssapi, GSSError = None, Exception

KEYTAB_ENV = "RUNYARD_KERBEROS_KEYTAB"
PRINCIPAL_ENV = "RUNYARD_KERBEROS_PRINCIPAL"
TICKET_CACHE_ENV = "MLFLOW_KERBEROS_TICKET_CACHE"
USER_ENV = "MLFLOW_KERBEROS_USER"

log = logging.getLogger("runyard.server")

# Get a new ticket when less than this share of its lifetime is left (at most REFRESH_MARGIN_S):
# early enough that no request starts with a ticket about to lapse, late enough to spare the KDC.
REFRESH_SHARE = 0.25
REFRESH_MARGIN_S = 300
RETRY_S = 30  # a failed renewal (the KDC is down) is retried this often while the old ticket lasts


class KerberosError(Exception):
    """No usable ticket, or the SPNEGO exchange failed. The message names no principal, keytab or cache
    path (callers redact `KerberosSettings.secrets` too); `unreachable` when the KDC did not answer."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class KerberosSettings:
    principal: str | None = None
    keytab: str | None = None
    ticket_cache: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> KerberosSettings | None:
        """The settings when a keytab or ticket cache is configured, else None (no Kerberos asked for)."""
        keytab, cache = env.get(KEYTAB_ENV) or None, env.get(TICKET_CACHE_ENV) or None
        if not (keytab or cache):
            return None
        return cls(env.get(PRINCIPAL_ENV) or env.get(USER_ENV) or None, keytab, cache)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What error messages must not show: names and paths an attacker could use."""
        names = (self.principal, self.principal.split("@")[0]) if self.principal else ()
        return tuple(s for s in (*names, self.keytab, self.ticket_cache) if s)


def _reason(exc: GSSError) -> str:
    """The most specific text of a GSS-API error ('Decrypt integrity check failed', 'Ticket expired')."""
    messages = []
    for code, major in ((getattr(exc, "min_code", 0), False), (getattr(exc, "maj_code", 0), True)):
        try:
            messages += [m for m in exc.get_all_statuses(code, major) if m and m != "Success"]
        except Exception:  # noqa: BLE001 - only formatting; fall back to the whole text
            pass
    return messages[0] if messages else str(exc)


def _unreachable(reason: str) -> bool:
    return "Cannot contact any KDC" in reason or "Cannot find KDC" in reason


class Tickets:
    """Initiator credentials for one principal, renewed before they run out. Thread-safe."""

    def __init__(self, settings: KerberosSettings | None = None):
        if gssapi is None:
            raise KerberosError("Kerberos needs the gssapi package: pip install 'runyard[kerberos]'")
        self.settings = settings or KerberosSettings()
        self.acquisitions = 0  # how many times a ticket was (re)obtained: for logs and tests
        self._lock = threading.Lock()
        self._credentials: gssapi.Credentials | None = None
        self._refresh_below = 0.0
        self._retry_at = 0.0  # after a failed renewal, when to try again
        self._caches: list[str] = []  # private in-memory caches, newest last

    def credentials(self) -> gssapi.Credentials:
        """Credentials good for at least the refresh margin; raises KerberosError when none can be had."""
        with self._lock:
            current = self._remaining(self._credentials) if self._credentials is not None else 0
            if current <= self._refresh_below and (current <= 0 or time.monotonic() >= self._retry_at):
                try:
                    credentials = self._acquire()
                except KerberosError as exc:
                    if current <= 0:
                        raise
                    # The KDC failed us but the ticket we hold still works: use it, try again later.
                    self._retry_at = time.monotonic() + RETRY_S
                    reason = str(exc)
                    for secret in self.settings.secrets:
                        reason = reason.replace(secret, "***")
                    log.warning("Kerberos: could not renew the ticket (%s); the current one has %d s left",
                                reason, current)
                    return self._credentials
                lifetime = self._remaining(credentials)
                if lifetime <= 0:
                    raise KerberosError("the Kerberos ticket has expired (renew it, e.g. kinit -R, or set "
                                        f"{KEYTAB_ENV} so the server renews its own)")
                self._credentials = credentials
                self._refresh_below = min(lifetime * REFRESH_SHARE, REFRESH_MARGIN_S)
                self.acquisitions += 1
            return self._credentials

    @staticmethod
    def _remaining(credentials: gssapi.Credentials) -> float:
        try:
            lifetime = credentials.lifetime
        except GSSError:  # ExpiredCredentialsError among them
            return 0
        return float("inf") if lifetime is None else lifetime  # None: GSS_C_INDEFINITE

    def _acquire(self) -> gssapi.Credentials:
        settings = self.settings
        name = (gssapi.Name(settings.principal, gssapi.NameType.kerberos_principal)
                if settings.principal else None)
        if settings.keytab:
            # A new cache for every ticket: requests in flight keep reading the previous one untouched.
            # With "client_keytab", MIT Kerberos gets a fresh TGT into that cache (an AS exchange).
            cache = f"MEMORY:runyard-{uuid.uuid4().hex}"
            store, source = {"client_keytab": settings.keytab, "ccache": cache}, "from the keytab"
            self._caches.append(cache)
        elif settings.ticket_cache:
            store, source = {"ccache": settings.ticket_cache}, f"in the ticket cache ({TICKET_CACHE_ENV})"
        else:
            store, source = None, "in the default ticket cache"
        try:
            credentials = gssapi.Credentials(name=name, usage="initiate", store=store)
            self._remaining(credentials)  # surfaces a cache without a ticket now rather than mid-request
        except GSSError as exc:
            reason = _reason(exc)
            raise KerberosError(f"no Kerberos ticket {source}: {reason}", _unreachable(reason)) from None
        self._forget_old_caches()
        return credentials

    def _forget_old_caches(self, keep: int = 2) -> None:
        # Keep the current and the previous cache (a request may still be using it); free the rest.
        while len(self._caches) > keep:
            _destroy_cache(self._caches.pop(0))

    def close(self) -> None:
        with self._lock:
            self._credentials = None
            self._forget_old_caches(keep=0)


def _destroy_cache(name: str) -> None:
    try:  # pyspnego's `krb5` binding (installed with requests-kerberos); without it the few kB stay
        import krb5

        context = krb5.init_context()
        krb5.cc_destroy(context, krb5.cc_resolve(context, name.encode()))
    except Exception:  # noqa: BLE001 - best effort: an in-memory cache dies with the process anyway
        pass


def _negotiate_token(response: requests.Response) -> bytes | None:
    for challenge in response.headers.get("WWW-Authenticate", "").split(","):
        scheme, _, token = challenge.strip().partition(" ")
        if scheme.lower() == "negotiate":
            return base64.b64decode(token.strip()) if token.strip() else b""
    return None


class SpnegoAuth(requests.auth.AuthBase):
    """HTTP Negotiate (RFC 4559) with Kerberos: answers the server's 401 challenge with a ticket for
    HTTP/<host>, then checks the server's mutual-authentication token when it sends one.

    Each exchange has its own security context, so one session serves many threads. A request whose
    body was a stream cannot be sent twice: such a 401 is returned as it is.
    """

    def __init__(self, tickets: Tickets, service: str = "HTTP"):
        self.tickets = tickets
        self.service = service

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.register_hook("response", self._on_response)
        return request

    def _on_response(self, response: requests.Response, **kwargs) -> requests.Response:
        request = response.request
        if (response.status_code != 401 or _negotiate_token(response) is None
                or "Authorization" in request.headers
                or not (request.body is None or isinstance(request.body, bytes | str))):
            return response
        host = urlsplit(response.url).hostname or ""
        target = gssapi.Name(f"{self.service}@{host}", gssapi.NameType.hostbased_service)
        try:
            context = gssapi.SecurityContext(name=target, creds=self.tickets.credentials(), usage="initiate",
                                             mech=gssapi.MechType.kerberos)  # mutual auth is a default flag
            token = context.step()
        except GSSError as exc:
            reason = _reason(exc)
            raise KerberosError(f"no Kerberos service ticket for {self.service}/{host}: {reason}",
                                _unreachable(reason)) from None
        response.content  # noqa: B018 - read the 401 body so its connection goes back to the pool
        response.close()
        retry_request = request.copy()
        retry_request.headers["Authorization"] = f"Negotiate {base64.b64encode(token).decode()}"
        retry = response.connection.send(retry_request, **kwargs)
        retry.history.append(response)
        retry.request = retry_request
        server_token = _negotiate_token(retry)
        if server_token and not context.complete:
            try:
                context.step(server_token)
            except GSSError as exc:
                retry.close()
                raise KerberosError(f"the server failed Kerberos mutual authentication: {_reason(exc)}"
                                    ) from None
        return retry

