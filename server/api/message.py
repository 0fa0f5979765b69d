"""Request decoding: a JSON body or a query string becomes a `Message` whose typed getters validate each
field and name it in the error, the way MLflow's proto parsing does.

Field names are snake_case; the lowerCamelCase JSON spelling is accepted too, but not both at once.
Query-string values arrive as strings, so in a query message numbers and booleans are parsed from text
and repeated keys form lists.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import orjson

from server.errors import RunyardError, invalid

_MISSING = object()
INT64_MAX = 2**63 - 1
# Dataset profiles (16 MiB) and schemas (1 MiB) are the largest legitimate JSON fields.
MAX_JSON_BODY = 64 * 2**20


@functools.cache
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 100 else text[:97] + "..."


def _bad(name: str, value: Any, why: str):
    return invalid(f"Invalid value {_show(value)} for parameter '{name}' supplied: {why}")


class Message:
    """One request's fields. `from_query` marks values that came from a URL (all strings)."""

    __slots__ = ("data", "from_query", "user")

    def __init__(self, data: dict, from_query: bool = False):
        self.data = data
        self.from_query = from_query
        self.user: str | None = None  # who made the request, as a trusted proxy says (X-Forwarded-User)

    @classmethod
    def from_json(cls, body: bytes) -> Message:
        if not body.strip():
            return cls({})
        data = _loads(body)
        if isinstance(data, str):  # old clients double-encode
            data = _loads(data)
        if not isinstance(data, dict):
            raise invalid("The request body must be a JSON object.")
        return cls(data)

    @classmethod
    async def from_request_body(cls, request) -> Message:
        """The JSON body of a Starlette request, refused past MAX_JSON_BODY before it is buffered:
        a request must not be able to exhaust memory."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_JSON_BODY:
            raise _too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_JSON_BODY:
                raise _too_large()
            chunks.append(chunk)
        return cls.from_json(b"".join(chunks))

    @classmethod
    def from_query_items(cls, items: list[tuple[str, str]]) -> Message:
        data: dict[str, Any] = {}
        for key, value in items:
            if key in data:
                prior = data[key]
                data[key] = prior + [value] if isinstance(prior, list) else [prior, value]
            else:
                data[key] = value
        return cls(data, from_query=True)

    def raw(self, name: str) -> Any:
        camel = _camel(name)
        value = self.data.get(name, _MISSING)
        if camel != name and camel in self.data:
            if value is not _MISSING:
                raise invalid(f"Parameter '{name}' is given twice (as '{name}' and '{camel}').")
            value = self.data[camel]
        return None if value is _MISSING else value

    def has(self, name: str) -> bool:
        return self.raw(name) is not None

    def _scalar(self, name: str) -> Any:
        value = self.raw(name)
        if self.from_query and isinstance(value, list):
            value = value[-1]
        return value

    @staticmethod
    def missing(name: str):
        return invalid(f"Missing value for required parameter '{name}'. "
                       "See the API docs for more information about request parameters.")

    def str(self, name: str, required: bool = False, default: str | None = None) -> str | None:
        value = self._scalar(name)
        if value is None:
            if required:
                raise self.missing(name)
            return default
        if not isinstance(value, str):
            raise _bad(name, value, "expected a string")
        return value

    def int(self, name: str, required: bool = False, default: int | None = None) -> int | None:
        value = self._scalar(name)
        if value is None:
            if required:
                raise self.missing(name)
            return default
        if isinstance(value, bool):
            raise _bad(name, value, "expected an integer")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise _bad(name, value, "expected an integer") from None
        elif isinstance(value, float):
            if not value.is_integer():
                raise _bad(name, value, "expected an integer")
            value = int(value)
        elif not isinstance(value, int):
            raise _bad(name, value, "expected an integer")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise _bad(name, value, "out of the int64 range")
        return value

    def float(self, name: str, required: bool = False) -> float | None:
        value = self._scalar(name)
        if value is None:
            if required:
                raise self.missing(name)
            return None
        return parse_double(name, value)

    def bool(self, name: str, default: bool = False) -> bool:
        value = self._scalar(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(name, value, "expected a boolean")

    def enum(self, name: str, names: dict[str, int], default: str | None = None) -> str | None:
        """An enum given by name or by number, returned as its name."""
        value = self._scalar(name)
        if value is None:
            return default
        if isinstance(value, str) and value in names:
            return value
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.isdigit():
            number = int(value)
        for enum_name, enum_number in names.items():
            if number == enum_number:
                return enum_name
        raise _bad(name, value, f"expected one of {', '.join(names)}")

    def str_list(self, name: str) -> list[str]:
        value = self.raw(name)
        if value is None:
            return []
        if isinstance(value, str) and self.from_query:
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(name, value, "expected a list of strings")
        return value

    def objects(self, name: str) -> list[Message]:
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _bad(name, value, "expected a list of objects")
        return [Message(v) for v in value]

    def pairs(self, name: str) -> list[tuple[str, str]]:
        """A list of {key, value} objects (tags, params) as (key, value) tuples."""
        return [(m.str("key", required=True), m.str("value", default="")) for m in self.objects(name)]

    def object(self, name: str) -> Message | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _bad(name, value, "expected an object")
        return Message(value)


def _too_large() -> RunyardError:
    return RunyardError(f"The request body exceeds {MAX_JSON_BODY // 2**20} MiB; JSON requests must be "
                        "smaller (upload large files through the artifact routes).",
                        "INVALID_PARAMETER_VALUE", status=413)


def _loads(text: bytes | str):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    # Python-written bodies may carry bare NaN/Infinity tokens, which strict JSON (orjson) refuses.
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise invalid("Malformed JSON in the request body.") from None


def parse_double(name: str, value: Any) -> float:
    """A double as MLflow's JSON carries it: a number, or "NaN"/"Infinity"/"-Infinity" (or numeric text)."""
    if isinstance(value, bool):
        raise _bad(name, value, "expected a number")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            raise _bad(name, value, "out of the double range") from None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _bad(name, value, "expected a number") from None
        if math.isnan(number) and value.strip().lower() not in ("nan",):
            raise _bad(name, value, "expected a number")
        return number
    raise _bad(name, value, "expected a number")
