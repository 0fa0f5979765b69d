"""The bearer-token check NGINX's auth_request calls before it forwards a request.

200 with `X-Runyard-User: <user>` for a valid token, 401 for anything else. NGINX keeps the path
`/_runyard/` from the outside world; the answer says nothing about why a token was refused.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from server.api.routing import raw_route

USER_HEADER = "x-runyard-user"


async def check_token(request, ctx) -> Response:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = None
    if scheme.lower() == "bearer" and token.strip():
        user = await run_in_threadpool(ctx.tokens.authenticate, token.strip())
    if user is None:
        return Response(status_code=401, headers={"www-authenticate": "Bearer"})
    return Response(status_code=200, headers={USER_HEADER: user, "cache-control": "no-store"})


ROUTES = [raw_route("GET", "/_runyard/auth", check_token, prefixed=False)]
