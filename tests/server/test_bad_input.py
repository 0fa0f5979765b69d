"""Bad input over raw HTTP: every rejection is a 4xx JSON envelope with MLflow's error code and a message that
names the problem, never a stack trace, and a rejected write leaves no trace (no rows, no files).

Artifact paths are sent byte-for-byte with `http.client`, so no client library normalises `..`, `%2e%2e` or
backslashes before the server sees them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def assert_rejected(
    status: int, body: bytes | str, headers, want_status: int, want_code: str, *fragments: str
) -> str:
    """The response is a JSON error envelope with the expected status and code; the message mentions at
    least one of `fragments` (case-insensitive) when any are given; no traceback text anywhere."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    assert status == want_status, f"expected {want_status}, got {status}: {text[:500]}"
    content_type = headers.get("content-type", "")
    assert content_type.startswith("application/json"), f"content-type {content_type!r}: {text[:300]}"
    assert "Traceback" not in text and 'File "' not in text, text
    envelope = json.loads(text)
    assert envelope["error_code"] == want_code, envelope
    message = envelope["message"]
    assert isinstance(message, str) and message.strip()
    if fragments:
        assert any(f.lower() in message.lower() for f in fragments), (
            f"message does not name the problem ({' | '.join(fragments)}): {message!r}"
        )
    return message


def rejected(response: requests.Response, status: int, code: str, *fragments: str) -> str:
    return assert_rejected(response.status_code, response.content, response.headers, status, code, *fragments)


class Api:
    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()

    def post(self, path: str, body=None, **kwargs):
        return self.http.post(
            f"{self.url}{API}{path}", json=body if body is not None else {}, timeout=60, **kwargs
        )

    def post_raw(self, path: str, data: bytes | str):
        return self.http.post(
            f"{self.url}{API}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60
        )

    def get(self, path: str, params=None):
        return self.http.get(f"{self.url}{API}{path}", params=params, timeout=60)

    def ok(self, response) -> dict:
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        return response.json()

    def experiment(self) -> str:
        return self.ok(self.post("/experiments/create", {"name": unique("bad")}))["experiment_id"]

    def run_id(self, experiment_id: str | None = None) -> str:
        exp = experiment_id or self.experiment()
        return self.ok(self.post("/runs/create", {"experiment_id": exp}))["run"]["info"]["run_id"]

    def run(self, run_id: str) -> dict:
        return self.ok(self.get("/runs/get", {"run_id": run_id}))["run"]

    def experiment_count(self) -> int:
        body = self.ok(self.post("/experiments/search", {"max_results": 50000, "view_type": "ALL"}))
        return len(body.get("experiments", []))

    def user_data(self, run_id: str) -> dict:
        """What a client logged: metrics, params and tags other than the server-managed run name."""
        data = self.run(run_id)["data"]
        return {
            "metrics": data.get("metrics", []),
            "params": data.get("params", []),
            "tags": [t for t in data.get("tags", []) if t["key"] != "mlflow.runName"],
        }


EMPTY = {"metrics": [], "params": [], "tags": []}


@pytest.fixture(scope="module")
def api(server) -> Api:
    return Api(server.url)


def metric(key="m", value=1.0, timestamp=1, step=0) -> dict:
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


# ------------------------------------------------------------------------------------------------------
# bodies that are not what the API expects
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragments",
    [
        ('{"name": "x",', ("json",)),
        ('{"name": }', ("json",)),
        ("not json at all", ("json",)),
        ('{"name": "x"} trailing', ("json",)),
        ('[{"name": "x"}]', ("object",)),
        ("[]", ("object",)),
        ("42", ("object",)),
        ('"\\"just a string\\""', ("object", "json")),
        ('"{\\"name\\": "', ("json",)),
    ],
)
def test_malformed_or_non_object_json(api, body, fragments):
    before = api.experiment_count()
    rejected(api.post_raw("/experiments/create", body), 400, "INVALID_PARAMETER_VALUE", *fragments)
    assert api.experiment_count() == before


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": "abc"}, "step"),
        ("/runs/log-metric", {"key": "m", "value": 1.0, "timestamp": "yesterday", "step": 0}, "timestamp"),
        ("/runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1.5, "step": 0}, "timestamp"),
        ("/runs/log-metric", {"key": "m", "value": True, "timestamp": 1, "step": 0}, "value"),
        ("/runs/log-metric", {"key": "m", "value": "one", "timestamp": 1, "step": 0}, "value"),
        ("/runs/log-metric", {"key": "m", "value": {"v": 1}, "timestamp": 1, "step": 0}, "value"),
        ("/runs/log-metric", {"key": {"k": 1}, "value": 1.0, "timestamp": 1, "step": 0}, "key"),
        ("/runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1, "step": True}, "step"),
        ("/runs/log-parameter", {"key": ["a"], "value": "v"}, "key"),
        ("/runs/set-tag", {"key": 12, "value": "v"}, "key"),
        ("/runs/set-tag", {"key": "t", "value": {"nested": 1}}, "value"),
        ("/runs/log-batch", {"metrics": {"key": "m"}}, "metrics"),
        ("/runs/log-batch", {"params": "p=1"}, "params"),
        ("/runs/log-batch", {"tags": [1, 2]}, "tags"),
        ("/runs/log-batch", {"metrics": [metric(timestamp="soon")]}, "timestamp"),
    ],
)
def test_wrong_types_are_rejected_and_nothing_is_written(api, path, body, field):
    run_id = api.run_id()
    rejected(api.post(path, {"run_id": run_id, **body}), 400, "INVALID_PARAMETER_VALUE", field)
    assert api.user_data(run_id) == EMPTY


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/experiments/create", {"name": {"a": 1}}, "name"),
        ("/experiments/create", {"name": 5}, "name"),
        ("/experiments/create", {"name": unique("t"), "tags": "x"}, "tags"),
        ("/runs/search", {"experiment_ids": "1"}, "experiment_ids"),
        ("/runs/search", {"experiment_ids": [], "max_results": "ten"}, "max_results"),
        ("/runs/search", {"experiment_ids": [], "max_results": False}, "max_results"),
        ("/runs/search", {"experiment_ids": [], "filter": 7}, "filter"),
        ("/runs/search", {"experiment_ids": [], "order_by": "start_time"}, "order_by"),
        ("/experiments/search", {"max_results": 10, "view_type": "SOMETIMES"}, "view_type"),
    ],
)
def test_wrong_types_on_experiment_and_search_routes(api, path, body, field):
    before = api.experiment_count()
    rejected(api.post(path, body), 400, "INVALID_PARAMETER_VALUE", field)
    assert api.experiment_count() == before


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/runs/log-metric", {"value": 1.0, "timestamp": 1, "step": 0}, "key"),
        ("/runs/log-metric", {"key": "m", "timestamp": 1, "step": 0}, "value"),
        ("/runs/log-metric", {"key": "m", "value": 1.0, "step": 0}, "timestamp"),
        ("/runs/log-parameter", {"value": "v"}, "key"),
        ("/runs/set-tag", {"value": "v"}, "key"),
        ("/runs/log-batch", {"metrics": [{"value": 1.0, "timestamp": 1}]}, "key"),
        ("/runs/log-batch", {"params": [{"value": "v"}]}, "key"),
    ],
)
def test_missing_required_fields(api, path, body, field):
    run_id = api.run_id()
    rejected(api.post(path, {"run_id": run_id, **body}), 400, "INVALID_PARAMETER_VALUE", field)
    assert api.user_data(run_id) == EMPTY


def test_missing_ids_and_names(api):
    before = api.experiment_count()
    rejected(api.post("/experiments/create", {}), 400, "INVALID_PARAMETER_VALUE", "name")
    rejected(api.post("/experiments/create", {"name": "   "}), 400, "INVALID_PARAMETER_VALUE", "name")
    assert api.experiment_count() == before
    rejected(
        api.post("/runs/log-metric", {"key": "m", "value": 1.0, "timestamp": 1}),
        400,
        "INVALID_PARAMETER_VALUE",
        "run_id",
    )
    rejected(api.get("/runs/get"), 400, "INVALID_PARAMETER_VALUE", "run_id")
    rejected(api.get("/experiments/get"), 400, "INVALID_PARAMETER_VALUE", "experiment_id")
    rejected(api.get("/experiments/get-by-name"), 400, "INVALID_PARAMETER_VALUE", "experiment_name")
    run_id = api.run_id()
    rejected(
        api.get("/metrics/get-history", {"run_id": run_id}), 400, "INVALID_PARAMETER_VALUE", "metric_key"
    )


# ------------------------------------------------------------------------------------------------------
# batch limits and all-or-nothing batches
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, fragments",
    [
        ({"metrics": [metric("m", float(i), 1, i) for i in range(1001)]}, ("1000", "metrics")),
        ({"params": [{"key": f"p{i}", "value": "v"} for i in range(101)]}, ("100", "params")),
        ({"tags": [{"key": f"t{i}", "value": "v"} for i in range(101)]}, ("100", "tags")),
        (
            {
                "metrics": [metric("m", float(i), 1, i) for i in range(1000)],
                "params": [{"key": "p", "value": "v"}],
            },
            ("1000",),
        ),
        (
            {
                "metrics": [metric("m", float(i), 1, i) for i in range(901)],
                "params": [{"key": f"p{i}", "value": "v"} for i in range(50)],
                "tags": [{"key": f"t{i}", "value": "v"} for i in range(50)],
            },
            ("1000",),
        ),
    ],
)
def test_over_limit_batches_are_rejected_whole(api, batch, fragments):
    run_id = api.run_id()
    rejected(
        api.post("/runs/log-batch", {"run_id": run_id, **batch}), 400, "INVALID_PARAMETER_VALUE", *fragments
    )
    assert api.user_data(run_id) == EMPTY


def test_batches_at_the_limits_are_accepted(api):
    run_id = api.run_id()
    api.ok(
        api.post(
            "/runs/log-batch",
            {"run_id": run_id, "metrics": [metric("m", float(i), 1, i) for i in range(1000)]},
        )
    )
    api.ok(
        api.post(
            "/runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [metric("n", float(i), 1, i) for i in range(800)],
                "params": [{"key": f"p{i}", "value": "v"} for i in range(100)],
                "tags": [{"key": f"t{i}", "value": "v"} for i in range(100)],
            },
        )
    )
    data = api.user_data(run_id)
    assert (len(data["params"]), len(data["tags"])) == (100, 100)
    assert {m["key"]: m["step"] for m in data["metrics"]} == {"m": 999, "n": 799}
    history = api.ok(api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "m"}))["metrics"]
    assert len(history) == 1000


def test_one_bad_metric_spoils_the_whole_batch(api):
    run_id = api.run_id()
    good = [metric("good", float(i), 1, i) for i in range(999)]
    for bad in (
        metric("bad key!"),
        metric("m", value="x"),
        metric("m", timestamp=-5),
        {"key": "m", "value": 1.0},
    ):
        body = {
            "run_id": run_id,
            "metrics": good + [bad],
            "params": [{"key": "p", "value": "v"}],
            "tags": [{"key": "t", "value": "v"}],
        }
        rejected(api.post("/runs/log-batch", body), 400, "INVALID_PARAMETER_VALUE")
        assert api.user_data(run_id) == EMPTY, bad
    assert api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "good"}).json() == {}


def test_duplicate_param_keys_in_one_batch(api):
    run_id = api.run_id()
    body = {
        "run_id": run_id,
        "metrics": [metric()],
        "params": [
            {"key": "dup", "value": "a"},
            {"key": "other", "value": "x"},
            {"key": "dup", "value": "b"},
        ],
    }
    rejected(api.post("/runs/log-batch", body), 400, "INVALID_PARAMETER_VALUE", "dup", "duplicate")
    assert api.user_data(run_id) == EMPTY


def test_changing_a_param_in_a_batch_rejects_the_batch(api):
    run_id = api.run_id()
    api.ok(api.post("/runs/log-parameter", {"run_id": run_id, "key": "fixed", "value": "a"}))
    body = {
        "run_id": run_id,
        "metrics": [metric("after")],
        "params": [{"key": "fixed", "value": "b"}],
        "tags": [{"key": "after", "value": "v"}],
    }
    rejected(api.post("/runs/log-batch", body), 400, "INVALID_PARAMETER_VALUE", "fixed")
    assert api.user_data(run_id) == {"metrics": [], "params": [{"key": "fixed", "value": "a"}], "tags": []}


# ------------------------------------------------------------------------------------------------------
# keys and values
# ------------------------------------------------------------------------------------------------------

BAD_KEYS = [
    "../x",
    "a//b",
    "bad key!",
    "k" * 251,
    "/abs",
    "trail/",
    "a/./b",
    ".",
    "",
    "semi;colon",
    "tab\tkey",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k[:20]))
def test_bad_keys_for_metrics_params_and_tags(api, key):
    run_id = api.run_id()
    if len(key) > 250:
        expect = ("250",)  # the limit is named
    elif key and key.isprintable():
        expect = (f"'{key}'", f'"{key}"')  # the offending key is quoted in the message
    else:
        expect = ("key", "name")
    attempts = [
        ("/runs/log-metric", {"run_id": run_id, **metric(key)}),
        ("/runs/log-parameter", {"run_id": run_id, "key": key, "value": "v"}),
        ("/runs/set-tag", {"run_id": run_id, "key": key, "value": "v"}),
        ("/runs/log-batch", {"run_id": run_id, "metrics": [metric(key)]}),
        ("/runs/log-batch", {"run_id": run_id, "params": [{"key": key, "value": "v"}]}),
        ("/runs/log-batch", {"run_id": run_id, "tags": [{"key": key, "value": "v"}]}),
    ]
    exp_id = api.experiment()
    attempts.append(("/experiments/set-experiment-tag", {"experiment_id": exp_id, "key": key, "value": "v"}))
    failures = []
    for path, body in attempts:
        try:
            rejected(api.post(path, body), 400, "INVALID_PARAMETER_VALUE", *expect)
        except AssertionError as exc:
            failures.append(f"{path} {sorted(body)}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)
    assert api.user_data(run_id) == EMPTY
    tags = api.ok(api.get("/experiments/get", {"experiment_id": exp_id}))["experiment"].get("tags", [])
    assert [t for t in tags if not t["key"].startswith("mlflow.")] == []


def test_negative_timestamp_is_rejected(api):
    run_id = api.run_id()
    rejected(
        api.post("/runs/log-metric", {"run_id": run_id, **metric(timestamp=-1)}),
        400,
        "INVALID_PARAMETER_VALUE",
        "timestamp",
    )
    assert api.user_data(run_id) == EMPTY


def test_oversized_values(api):
    run_id = api.run_id()
    # params longer than 6000 characters are truncated (MLflow's default), never a 500
    api.ok(api.post("/runs/log-parameter", {"run_id": run_id, "key": "long", "value": "x" * 7000}))
    params = api.user_data(run_id)["params"]
    assert params == [{"key": "long", "value": "x" * 6000}]
    exp_id = api.experiment()
    rejected(
        api.post(
            "/experiments/set-experiment-tag", {"experiment_id": exp_id, "key": "big", "value": "v" * 20001}
        ),
        400,
        "INVALID_PARAMETER_VALUE",
        "20000",
        "length",
        "long",
    )
    before = api.experiment_count()
    rejected(
        api.post("/experiments/create", {"name": "n" * 501}),
        400,
        "INVALID_PARAMETER_VALUE",
        "500",
        "length",
        "long",
    )
    assert api.experiment_count() == before


# ------------------------------------------------------------------------------------------------------
# search: filters, order_by, page tokens, max_results
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filter_string, fragments",
    [
        ("metrics.loss >>> 1", (">>>", "comparator")),
        ("metrics.loss === 1", ("===", "comparator")),
        ("foo = 'x'", ("foo", "identifier", "entity")),
        ("params.a = 1", ("params", "string", "quot", "value")),
        ("tags.t = 1", ("tag", "string", "quot", "value")),
        ("metrics.a = 'x'", ("metric", "numeric", "number", "value")),
        ("metrics.a > 1 OR metrics.b < 2", ("or", "invalid", "filter")),
        ("params.a = 'x' or params.b = 'y'", ("or", "invalid", "filter")),
        ("params.a = 'unbalanced", ("quot", "unbalanced", "unterminated", "invalid", "filter")),
        ('tags.t = "also unbalanced', ("quot", "unbalanced", "unterminated", "invalid", "filter")),
        ("metrics.loss <", ("invalid", "filter", "value")),
        ("params.a LIKE", ("invalid", "filter", "value")),
        ("metrics.loss > 1 AND", ("invalid", "filter", "and")),
        ("(metrics.loss > 1)", ("invalid", "filter")),
        ("attributes.nope = 'x'", ("nope", "attribute")),
        ("attributes.start_time = 'yesterday'", ("start_time", "numeric", "number", "value")),
        ("params.a IN ('x')", ("in", "comparator")),
        ("metrics.loss LIKE '1%'", ("like", "comparator")),
    ],
)
def test_bad_run_filters(api, filter_string, fragments):
    exp_id = api.experiment()
    api.run_id(exp_id)
    rejected(
        api.post("/runs/search", {"experiment_ids": [exp_id], "filter": filter_string}),
        400,
        "INVALID_PARAMETER_VALUE",
        *fragments,
    )


@pytest.mark.parametrize(
    "filter_string, fragments",
    [
        ("nope = 'x'", ("nope", "attribute", "identifier")),
        ("name >>> 'x'", (">>>", "comparator")),
        ("name = 'a' OR name = 'b'", ("or", "invalid", "filter")),
        ("name = 'unbalanced", ("quot", "unterminated", "invalid", "filter")),
        ("creation_time > 'soon'", ("creation_time", "numeric", "number", "value")),
    ],
)
def test_bad_experiment_filters(api, filter_string, fragments):
    rejected(
        api.post("/experiments/search", {"max_results": 10, "filter": filter_string}),
        400,
        "INVALID_PARAMETER_VALUE",
        *fragments,
    )


@pytest.mark.parametrize(
    "order_by, fragments",
    [
        ("metrics.loss SIDEWAYS", ("sideways", "order", "direction")),
        ("unknown.loss DESC", ("unknown", "order", "entity")),
        ("attributes.nope ASC", ("nope", "order", "attribute")),
        ("metrics.loss DESC extra", ("order",)),
        ("", ("order",)),
        ("params.", ("order", "params")),
    ],
)
def test_bad_order_by(api, order_by, fragments):
    exp_id = api.experiment()
    rejected(
        api.post("/runs/search", {"experiment_ids": [exp_id], "order_by": [order_by]}),
        400,
        "INVALID_PARAMETER_VALUE",
        *fragments,
    )
    if order_by:
        rejected(
            api.post("/experiments/search", {"max_results": 5, "order_by": [order_by]}),
            400,
            "INVALID_PARAMETER_VALUE",
            *fragments,
        )


@pytest.mark.parametrize(
    "token",
    [
        "garbage!!",
        "%%%",
        base64.b64encode(b"not json").decode(),
        base64.b64encode(b'{"offset": -5}').decode(),
        base64.b64encode(b'{"offset": "ten"}').decode(),
        base64.b64encode(b"[1, 2]").decode(),
    ],
)
def test_bad_page_tokens(api, token):
    exp_id = api.experiment()
    api.run_id(exp_id)
    rejected(
        api.post("/runs/search", {"experiment_ids": [exp_id], "page_token": token}),
        400,
        "INVALID_PARAMETER_VALUE",
        "token",
    )
    rejected(
        api.post("/experiments/search", {"max_results": 5, "page_token": token}),
        400,
        "INVALID_PARAMETER_VALUE",
        "token",
    )
    run_id = api.run_id(exp_id)
    rejected(
        api.get(
            "/metrics/get-history",
            {"run_id": run_id, "metric_key": "m", "max_results": 5, "page_token": token},
        ),
        400,
        "INVALID_PARAMETER_VALUE",
        "token",
    )


@pytest.mark.parametrize("max_results", [0, -1, 50001, 10**12])
def test_max_results_out_of_range(api, max_results):
    exp_id = api.experiment()
    rejected(
        api.post("/runs/search", {"experiment_ids": [exp_id], "max_results": max_results}),
        400,
        "INVALID_PARAMETER_VALUE",
        "max_results",
    )
    rejected(
        api.post("/experiments/search", {"max_results": max_results}),
        400,
        "INVALID_PARAMETER_VALUE",
        "max_results",
    )
    if max_results <= 0:
        run_id = api.run_id(exp_id)
        rejected(
            api.get(
                "/metrics/get-history", {"run_id": run_id, "metric_key": "m", "max_results": str(max_results)}
            ),
            400,
            "INVALID_PARAMETER_VALUE",
            "max_results",
        )


def test_search_max_results_at_the_limit_is_fine(api):
    exp_id = api.experiment()
    assert api.ok(api.post("/runs/search", {"experiment_ids": [exp_id], "max_results": 50000})) == {}
    assert "experiments" in api.ok(api.post("/experiments/search", {"max_results": 50000}))


# ------------------------------------------------------------------------------------------------------
# unknown and malformed ids
# ------------------------------------------------------------------------------------------------------


def test_unknown_run_ids(api):
    ghost = uuid.uuid4().hex
    calls = [
        api.get("/runs/get", {"run_id": ghost}),
        api.get("/metrics/get-history", {"run_id": ghost, "metric_key": "m"}),
        api.post("/runs/log-metric", {"run_id": ghost, **metric()}),
        api.post("/runs/log-parameter", {"run_id": ghost, "key": "p", "value": "v"}),
        api.post("/runs/set-tag", {"run_id": ghost, "key": "t", "value": "v"}),
        api.post("/runs/delete-tag", {"run_id": ghost, "key": "t"}),
        api.post("/runs/log-batch", {"run_id": ghost, "metrics": [metric()]}),
        api.post("/runs/update", {"run_id": ghost, "status": "FINISHED"}),
        api.post("/runs/delete", {"run_id": ghost}),
        api.post("/runs/restore", {"run_id": ghost}),
    ]
    for response in calls:
        rejected(response, 404, "RESOURCE_DOES_NOT_EXIST", ghost)


def test_unknown_experiment_ids(api):
    ghost = "987654321"
    before = api.experiment_count()
    calls = [
        api.get("/experiments/get", {"experiment_id": ghost}),
        api.post("/experiments/delete", {"experiment_id": ghost}),
        api.post("/experiments/restore", {"experiment_id": ghost}),
        api.post("/experiments/update", {"experiment_id": ghost, "new_name": unique("x")}),
        api.post("/experiments/set-experiment-tag", {"experiment_id": ghost, "key": "k", "value": "v"}),
        api.post("/runs/create", {"experiment_id": ghost}),
    ]
    for response in calls:
        rejected(response, 404, "RESOURCE_DOES_NOT_EXIST", ghost)
    assert api.experiment_count() == before


@pytest.mark.parametrize("bad_id", ["abc", "1.5", "0x10", "1; DROP TABLE experiments", "-"])
def test_non_integer_experiment_ids(api, bad_id):
    before = api.experiment_count()
    rejected(
        api.get("/experiments/get", {"experiment_id": bad_id}), 400, "INVALID_PARAMETER_VALUE", "experiment"
    )
    rejected(
        api.post("/runs/create", {"experiment_id": bad_id}), 400, "INVALID_PARAMETER_VALUE", "experiment"
    )
    rejected(
        api.post("/runs/search", {"experiment_ids": [bad_id]}), 400, "INVALID_PARAMETER_VALUE", "experiment"
    )
    rejected(
        api.post("/experiments/delete", {"experiment_id": bad_id}),
        400,
        "INVALID_PARAMETER_VALUE",
        "experiment",
    )
    assert api.experiment_count() == before


@pytest.mark.parametrize("bad_run_id", ["../etc", "a b", "x" * 300, "%00"])
def test_malformed_run_ids(api, bad_run_id):
    for response in (
        api.get("/runs/get", {"run_id": bad_run_id}),
        api.post("/runs/log-batch", {"run_id": bad_run_id, "metrics": [metric()]}),
    ):
        assert response.status_code in (400, 404), response.text
        rejected(
            response,
            response.status_code,
            "INVALID_PARAMETER_VALUE" if response.status_code == 400 else "RESOURCE_DOES_NOT_EXIST",
        )


# ------------------------------------------------------------------------------------------------------
# artifact paths that try to escape the artifact store
# ------------------------------------------------------------------------------------------------------


def raw_request(url: str, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
    """Send `target` exactly as given on the request line (no normalisation of any kind)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def escape_setup(api, server):
    """A run with one legitimate artifact; bait files next to (outside) the artifact store."""
    exp_id = api.experiment()
    run_id = api.run_id(exp_id)
    root = f"{exp_id}/{run_id}/artifacts"
    status, body, _ = raw_request(
        server.url, "PUT", f"{ARTIFACTS}/{root}/legit.txt", b"legit", {"Content-Type": "text/plain"}
    )
    assert status == 200, body
    token = uuid.uuid4().hex[:8]
    outside = server.artifacts.parent
    secret = outside / f"secret-{token}.txt"
    secret.write_text("TOP-SECRET")
    yield {"root": root, "token": token, "secret": secret, "outside": outside}
    secret.unlink(missing_ok=True)


def escape_paths(root: str, token: str, secret: Path) -> list[str]:
    depth = "../" * (len(root.split("/")) + 1)  # from the run root up and out of the artifact store
    name = secret.name
    abs_secret = quote(str(secret))
    return [
        f"../{name}",
        f"{root}/{depth}{name}",
        f"{root}/sub/../../../../../{name}",
        f"{root}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/{name}",
        f"%2e%2e/{name}",
        f"%2E%2E%2F{name}",
        f"{root}/..%2f..%2f..%2f..%2f{name}",
        f"{root}/..%5c..%5c..%5c..%5c{name}",
        f"{root}\\..\\..\\..\\..\\{name}",
        f"..\\{name}",
        abs_secret,  # absolute: the request line reads …/artifacts//tmp/…
        f"%2F{abs_secret.lstrip('/')}",
        f"{root}/x%23y-{token}.txt",
        f"{root}/nul%00-{token}.txt",
        f"{root}/%00",
        f"{root}/a%00/../b-{token}.txt",
        "C:%5Cwindows%5Cwin.ini",
    ]


def test_escaping_artifact_paths_are_rejected_everywhere(api, server, escape_setup):
    setup = escape_setup
    before = tree(setup["outside"])
    failures = []
    for path in escape_paths(setup["root"], setup["token"], setup["secret"]):
        target = f"{ARTIFACTS}/{path}"
        attempts = [
            ("GET", target, None),
            ("PUT", target, b"EVIL"),
            ("DELETE", target, None),
            ("GET", f"{ARTIFACTS}?path={path}", None),
        ]
        for method, request_target, body in attempts:
            status, data, headers = raw_request(
                server.url,
                method,
                request_target,
                body,
                {"Content-Type": "application/octet-stream"} if body else None,
            )
            try:
                assert_rejected(status, data, headers, 400, "INVALID_PARAMETER_VALUE", "path")
                assert b"TOP-SECRET" not in data
            except AssertionError as exc:
                failures.append(f"{method} {request_target}: {str(exc).splitlines()[0]}")
    assert not failures, "\n".join(failures)
    # nothing written, nothing deleted, anywhere around the artifact store
    assert setup["secret"].read_text() == "TOP-SECRET"
    assert tree(setup["outside"]) == before
    assert not [p for p in tree(setup["outside"]) if setup["token"] in p and "secret" not in p]
    status, data, _ = raw_request(server.url, "GET", f"{ARTIFACTS}/{setup['root']}/legit.txt")
    assert (status, data) == (200, b"legit")


def test_upload_to_a_directory_path_is_rejected(api, server, escape_setup):
    root = escape_setup["root"]
    before = tree(server.artifacts)
    status, data, headers = raw_request(
        server.url, "PUT", f"{ARTIFACTS}/{root}/dir/", b"x", {"Content-Type": "text/plain"}
    )
    assert_rejected(status, data, headers, 400, "INVALID_PARAMETER_VALUE", "path", "directory")
    status, data, headers = raw_request(
        server.url, "PUT", f"{ARTIFACTS}/", b"x", {"Content-Type": "text/plain"}
    )
    assert 400 <= status < 500 and "Traceback" not in data.decode("utf-8", "replace")
    assert tree(server.artifacts) == before


def test_download_of_missing_and_directory_artifacts(api, server, escape_setup):
    root = escape_setup["root"]
    status, data, headers = raw_request(server.url, "GET", f"{ARTIFACTS}/{root}/missing-{os.getpid()}.txt")
    assert_rejected(status, data, headers, 404, "RESOURCE_DOES_NOT_EXIST")
    status, data, headers = raw_request(
        server.url, "PUT", f"{ARTIFACTS}/{root}/folder/inner.txt", b"in", {"Content-Type": "text/plain"}
    )
    assert status == 200
    status, data, headers = raw_request(server.url, "GET", f"{ARTIFACTS}/{root}/folder")
    assert_rejected(status, data, headers, 400, "INVALID_PARAMETER_VALUE", "director")
