"""The credential check NGINX's auth_request calls before it forwards a request.

A bearer token (checked against the backend store) or, with --htpasswd, a basic-auth user and password.
200 with `X-Runyard-User: <user>` when valid, 401 for anything else; the answer never says why. NGINX
keeps the path `/_runyard/` from the outside world.
"""

from __future__ import annotations

import base64
import binascii

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from server.api.routing import raw_route

USER_HEADER = "x-runyard-user"


async def check(request, ctx) -> Response:
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    scheme, credential = scheme.lower(), credential.strip()
    user = None
    if scheme == "bearer" and credential:
        user = await run_in_threadpool(ctx.tokens.authenticate, credential)
    elif scheme == "basic" and credential and ctx.passwords is not None:
        name, password = _basic(credential)
        if name and await run_in_threadpool(ctx.passwords.verify, name, password):
            user = name
    if user is None:
        return Response(status_code=401)
    return Response(status_code=200, headers={USER_HEADER: user, "cache-control": "no-store"})


def _basic(credential: str) -> tuple[str, str]:
    try:
        name, _, password = base64.b64decode(credential, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return name, password


ROUTES = [raw_route("GET", "/_runyard/auth", check, prefixed=False)]  # server.app.QUIET_ROUTES
