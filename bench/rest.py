"""A thin REST client that speaks to the server the way the stock `mlflow` client does.

Same paths, JSON bodies, GET query parameters and headers; one keep-alive `requests.Session` per
client, like the stock client's cached session.
"""

from __future__ import annotations

import json
import time

import requests

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
CLIENT_VERSION = "3.17.2"
HEADERS = {
    "User-Agent": f"mlflow-python-client/{CLIENT_VERSION}",
    "X-MLflow-Client-Version": CLIENT_VERSION,
}
JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}
TIMEOUT = 120  # seconds; large enough for a slow full-history page, small enough to never hang a run


class ApiError(RuntimeError):
    pass


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


class Rest:
    def __init__(self, base_url: str):
        self.base = base_url
        self.session = requests.Session()
        self.session.headers.update(HEADERS)

    def close(self) -> None:
        self.session.close()

    def post_raw(self, path: str, data: bytes) -> requests.Response:
        """POST an already-encoded body; timed loops encode before the clock starts."""
        resp = self.session.post(self.base + API + path, data=data, headers=JSON_HEADERS, timeout=TIMEOUT)
        if resp.status_code != 200:
            raise ApiError(f"POST {path} -> {resp.status_code}: {resp.text[:300]}")
        return resp

    def post(self, path: str, body: dict) -> dict:
        return _json(self.post_raw(path, encode(body)))

    def get(self, path: str, params: dict) -> dict:
        resp = self.session.get(self.base + API + path, params=params, timeout=TIMEOUT)
        if resp.status_code != 200:
            raise ApiError(f"GET {path} -> {resp.status_code}: {resp.text[:300]}")
        return _json(resp)

    def artifact_url(self, rel_path: str) -> str:
        return f"{self.base}{ARTIFACTS}/{rel_path}"


def _json(resp: requests.Response) -> dict:
    # The stock client treats an empty 200 body as {}.
    return resp.json() if resp.content.strip() else {}


def with_retries(fn, attempts: int = 5):
    """Retry a seeding call on transport errors or 5xx ("database is locked" under concurrent seeding)."""
    for attempt in range(attempts):
        try:
            return fn()
        except (requests.ConnectionError, ApiError) as exc:
            retryable = isinstance(exc, requests.ConnectionError) or "-> 5" in str(exc)
            if not retryable or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def now_ms() -> int:
    return int(time.time() * 1000)


def client_tags(run_name: str) -> list[dict]:
    """The tags the stock client's context providers send with runs/create (api-notes §2.2)."""
    return [
        {"key": "mlflow.user", "value": "bench"},
        {"key": "mlflow.source.name", "value": "bench"},
        {"key": "mlflow.source.type", "value": "LOCAL"},
        {"key": "mlflow.runName", "value": run_name},
    ]


def create_run_body(experiment_id: str, run_name: str, extra_tags: list[dict] | None = None) -> dict:
    return {
        "experiment_id": experiment_id,
        "user_id": "bench",
        "run_name": run_name,
        "start_time": now_ms(),
        "tags": client_tags(run_name) + (extra_tags or []),
    }
