"""Route declarations shared by the API modules.

Two kinds of handler:
- `json_route`: a plain function `(msg: Message, ctx: Context) -> dict`; the app decodes the request into
  the message (query string for GET, JSON body otherwise), runs the function in the worker thread pool
  (store calls block) and encodes the dict with orjson. Path parameters are merged into the message.
- `raw_route`: `async (request, ctx, **path_params) -> Response`, for streaming and non-JSON answers.

Paths are written without the API prefix: "/mlflow/runs/create" with `versions=("2.0",)` is served at
`/api/2.0/mlflow/runs/create` and `/ajax-api/2.0/mlflow/runs/create`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_PARAM = re.compile(r"\{(\w+)(:path)?\}")


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    path: str  # without prefix, may contain {name} or {name:path}
    handler: Callable[..., Any]
    raw: bool
    versions: tuple[str, ...] = ("2.0",)
    prefixed: bool = True  # False: served at `path` as written (e.g. /health)

    def full_paths(self) -> list[str]:
        if not self.prefixed:
            return [self.path]
        return [f"/{api}/{v}{self.path}" for v in self.versions for api in ("api", "ajax-api")]


def json_route(methods: str | tuple[str, ...], path: str, handler: Callable, versions=("2.0",)) -> Route:
    methods = (methods,) if isinstance(methods, str) else methods
    return Route(methods, path, handler, raw=False, versions=versions)


def raw_route(methods: str | tuple[str, ...], path: str, handler: Callable, versions=("2.0",),
              prefixed: bool = True) -> Route:
    methods = (methods,) if isinstance(methods, str) else methods
    return Route(methods, path, handler, raw=True, versions=versions, prefixed=prefixed)


class Router:
    """Exact paths resolve through one dict lookup; templated paths through a short regex list."""

    def __init__(self, routes: list[Route]):
        self.exact: dict[str, dict[str, Route]] = {}
        self.templated: list[tuple[re.Pattern, str, dict[str, Route]]] = []
        by_template: dict[str, dict[str, Route]] = {}
        for route in routes:
            for full in route.full_paths():
                table = self.exact if not _PARAM.search(full) else by_template
                methods = table.setdefault(full, {})
                for method in route.methods:
                    if method in methods:
                        raise ValueError(f"duplicate route {method} {full}")
                    methods[method] = route
        for template, methods in by_template.items():
            self.templated.append((_compile(template), template, methods))

    def match(self, path: str) -> tuple[str, dict[str, Route], dict[str, str]] | None:
        """(route template, routes by method, path params) or None."""
        methods = self.exact.get(path)
        if methods is not None:
            return path, methods, {}
        for pattern, template, methods in self.templated:
            m = pattern.fullmatch(path)
            if m:
                return template, methods, m.groupdict()
        return None


def _compile(template: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PARAM.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>.*)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out), re.DOTALL)
