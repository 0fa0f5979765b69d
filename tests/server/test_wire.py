"""Raw HTTP against a running server: the wire conventions of MLflow's REST API (api-notes §0, §2, §8.2).

These use `requests` directly, so they pin down what any client (not only the Python one) sees: prefixes,
query-string arguments, DELETE bodies, NaN/Infinity, int64 and enum encodings, camelCase field names,
empty answers, page tokens, the error envelope, run-name bookkeeping and lifecycle rules.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
import requests

API = "/api/2.0/mlflow"
AJAX = "/ajax-api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
DOUBLE_MAX = 1.7976931348623157e308


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Api:
    """A thin JSON client for one server; every call returns the `requests.Response`."""

    def __init__(self, url: str):
        self.url = url
        self.http = requests.Session()

    def post(self, path: str, body=None, prefix: str = API, **kwargs):
        return self.http.post(
            f"{self.url}{prefix}{path}", json=body if body is not None else {}, timeout=60, **kwargs
        )

    def get(self, path: str, params=None, prefix: str = API, **kwargs):
        return self.http.get(f"{self.url}{prefix}{path}", params=params, timeout=60, **kwargs)

    def request(self, method: str, path: str, prefix: str = API, **kwargs):
        return self.http.request(method, f"{self.url}{prefix}{path}", timeout=60, **kwargs)

    # conveniences that must succeed
    def ok(self, response) -> dict:
        assert response.status_code == 200, f"{response.status_code} {response.text}"
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    def experiment(self, prefix: str = "wire") -> str:
        return self.ok(self.post("/experiments/create", {"name": unique(prefix)}))["experiment_id"]

    def run(self, experiment_id: str, **fields) -> dict:
        return self.ok(self.post("/runs/create", {"experiment_id": experiment_id, **fields}))["run"]

    def get_run(self, run_id: str) -> dict:
        return self.ok(self.get("/runs/get", {"run_id": run_id}))["run"]


def tags_of(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def assert_error(response, status: int, code: str):
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error_code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in response.text
    return body["message"]


@pytest.fixture(scope="module")
def api(server) -> Api:
    return Api(server.url)


# ------------------------------------------------------------------------------------------------------
# prefixes and GET query strings
# ------------------------------------------------------------------------------------------------------


def test_api_and_ajax_api_prefixes_serve_the_same_handlers(api):
    name = unique("prefix")
    exp_id = api.ok(api.post("/experiments/create", {"name": name}, prefix=AJAX))["experiment_id"]
    via_api = api.ok(api.get("/experiments/get-by-name", {"experiment_name": name}))["experiment"]
    via_ajax = api.ok(api.get("/experiments/get", {"experiment_id": exp_id}, prefix=AJAX))["experiment"]
    assert via_api == via_ajax
    assert via_api["experiment_id"] == exp_id and via_api["name"] == name

    run_id = api.run(exp_id)["info"]["run_id"]
    api.ok(
        api.post(
            "/runs/log-metric",
            {"run_id": run_id, "key": "m", "value": 1.5, "timestamp": 5, "step": 1},
            prefix=AJAX,
        )
    )
    history = api.ok(api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "m"}))
    assert [{k: m[k] for k in ("key", "value", "timestamp", "step")} for m in history["metrics"]] == [
        {"key": "m", "value": 1.5, "timestamp": 5, "step": 1}
    ]

    info = api.ok(api.get("/mlflow/server-info", prefix="/ajax-api/3.0"))
    assert info == api.ok(api.get("/mlflow/server-info", prefix="/api/3.0"))
    listed = api.ok(
        api.http.get(
            f"{api.url}/ajax-api/2.0/mlflow-artifacts/artifacts",
            params={"path": f"{exp_id}/{run_id}/artifacts"},
            timeout=60,
        )
    )
    assert listed == {}


def test_get_arguments_come_from_the_query_string(api):
    exp_id = api.experiment()
    run_id = api.run(exp_id)["info"]["run_id"]
    # the legacy spelling alone is enough
    by_uuid = api.ok(api.get("/runs/get", {"run_uuid": run_id}))["run"]
    assert by_uuid["info"]["run_id"] == run_id and by_uuid["info"]["run_uuid"] == run_id
    batch = [{"key": "q", "value": float(i), "timestamp": 100 + i, "step": i} for i in range(5)]
    api.ok(api.post("/runs/log-batch", {"run_id": run_id, "metrics": batch}))

    page = api.ok(
        api.get("/metrics/get-history", {"run_uuid": run_id, "metric_key": "q", "max_results": "2"})
    )
    assert [m["step"] for m in page["metrics"]] == [0, 1]
    steps, token = [0, 1], page["next_page_token"]
    for _ in range(5):  # bounded
        page = api.ok(
            api.get(
                "/metrics/get-history",
                {
                    "run_id": run_id,
                    "run_uuid": run_id,
                    "metric_key": "q",
                    "max_results": "2",
                    "page_token": token,
                },
            )
        )
        steps += [m["step"] for m in page["metrics"]]
        token = page.get("next_page_token")
        if not token:
            break
    assert steps == [0, 1, 2, 3, 4]
    assert "next_page_token" not in page


def test_repeated_query_keys_form_lists(api):
    prefix = unique("rep")
    ids = [api.ok(api.post("/experiments/create", {"name": f"{prefix}-{s}"}))["experiment_id"] for s in "abc"]
    base = [("filter", f"name LIKE '{prefix}-%'"), ("max_results", "10")]

    def names(query):
        body = api.ok(api.get("/experiments/search", query))
        return [e["name"][-1] for e in body.get("experiments", [])]

    assert names(base + [("order_by", "name DESC")]) == ["c", "b", "a"]
    # two order_by keys: the first decides; a server that kept only the last would sort by id (a, b, c)
    assert names(base + [("order_by", "name DESC"), ("order_by", "experiment_id ASC")]) == ["c", "b", "a"]
    assert names(base + [("order_by", "experiment_id DESC"), ("order_by", "name ASC")]) == ["c", "b", "a"]
    assert sorted(ids, key=int) == ids


def test_delete_requests_carry_a_json_body(api):
    exp_id = api.experiment()
    model = api.ok(api.post("/logged-models", {"experiment_id": exp_id, "name": "delme"}))["model"]
    model_id = model["info"]["model_id"]
    assert re.fullmatch(r"m-[0-9a-f]{32}", model_id)
    api.ok(
        api.request(
            "PATCH",
            f"/logged-models/{model_id}/tags",
            json={"model_id": model_id, "tags": [{"key": "k1", "value": "v1"}, {"key": "k2", "value": "v2"}]},
        )
    )
    api.ok(
        api.request(
            "DELETE", f"/logged-models/{model_id}/tags/k1", json={"model_id": model_id, "tag_key": "k1"}
        )
    )
    tags = api.ok(api.get(f"/logged-models/{model_id}"))["model"]["info"].get("tags", [])
    assert {t["key"]: t["value"] for t in tags} == {"k2": "v2"}

    response = api.request("DELETE", f"/logged-models/{model_id}", json={"model_id": model_id})
    assert api.ok(response) == {}
    assert_error(api.get(f"/logged-models/{model_id}"), 404, "RESOURCE_DOES_NOT_EXIST")
    found = api.ok(api.post("/logged-models/search", {"experiment_ids": [exp_id]}))
    assert found == {}


# ------------------------------------------------------------------------------------------------------
# scalars: NaN / Infinity, int64, enums, camelCase
# ------------------------------------------------------------------------------------------------------


def history_values(api, run_id: str, key: str) -> list:
    # parse the raw text ourselves: "NaN" must be a JSON string, not a bare NaN token
    body = json.loads(
        api.get("/metrics/get-history", {"run_id": run_id, "metric_key": key}).text,
        parse_constant=lambda token: pytest.fail(f"bare {token} in JSON output"),
    )
    return [(m["step"], m["value"]) for m in sorted(body["metrics"], key=lambda m: m["step"])]


def test_nan_and_infinity_as_json_strings(api):
    run_id = api.run(api.experiment())["info"]["run_id"]
    for step, value in enumerate(["NaN", "Infinity", "-Infinity", 2.5]):
        api.ok(
            api.post(
                "/runs/log-metric",
                {"run_id": run_id, "key": "odd", "value": value, "timestamp": 10, "step": step},
            )
        )
    assert history_values(api, run_id, "odd") == [(0, "NaN"), (1, DOUBLE_MAX), (2, -DOUBLE_MAX), (3, 2.5)]
    api.ok(
        api.post(
            "/runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [
                    {"key": "last_nan", "value": 1.0, "timestamp": 1, "step": 0},
                    {"key": "last_nan", "value": "NaN", "timestamp": 1, "step": 1},
                ],
            },
        )
    )
    latest = {m["key"]: m["value"] for m in api.get_run(run_id)["data"]["metrics"]}
    assert latest == {"odd": 2.5, "last_nan": "NaN"}


def test_nan_and_infinity_as_bare_json_numbers(api):
    """Python's json module (and MLflow's server, which parses with it) accept NaN/Infinity tokens."""
    run_id = api.run(api.experiment())["info"]["run_id"]
    for step, value in enumerate([float("nan"), float("inf"), float("-inf"), 1e308]):
        body = json.dumps({"run_id": run_id, "key": "bare", "value": value, "timestamp": 10, "step": step})
        api.ok(
            api.http.post(
                f"{api.url}{API}/runs/log-metric",
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
        )
    assert history_values(api, run_id, "bare") == [(0, "NaN"), (1, DOUBLE_MAX), (2, -DOUBLE_MAX), (3, 1e308)]


def test_int64_fields_are_json_numbers_and_accept_numeric_strings(api):
    exp_id = api.experiment()
    run = api.run(exp_id, start_time="1700000000123")
    assert run["info"]["start_time"] == 1700000000123
    assert isinstance(run["info"]["experiment_id"], str) and run["info"]["experiment_id"] == exp_id
    run_id = run["info"]["run_id"]
    big_ts, big_step = 2**53 + 1, 2**62 + 7  # not representable as doubles: must not pass through a float
    api.ok(
        api.post(
            "/runs/log-metric",
            {"run_id": run_id, "key": "k", "value": 1, "timestamp": big_ts, "step": big_step},
        )
    )
    api.ok(
        api.post(
            "/runs/log-metric", {"run_id": run_id, "key": "k", "value": 2, "timestamp": "42", "step": "-3"}
        )
    )
    text = api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "k"}).text
    assert f'"timestamp":{big_ts}' in text.replace(" ", "") and f'"step":{big_step}' in text.replace(" ", "")
    points = sorted((m["step"], m["timestamp"], m["value"]) for m in json.loads(text)["metrics"])
    assert points == [(-3, 42, 2.0), (big_step, big_ts, 1.0)]
    assert all(type(m["step"]) is int and type(m["timestamp"]) is int for m in json.loads(text)["metrics"])
    api.ok(api.post("/runs/update", {"run_id": run_id, "end_time": 1700000009999, "status": "FINISHED"}))
    info = api.get_run(run_id)["info"]
    assert (info["end_time"], type(info["end_time"])) == (1700000009999, int)


def test_enums_are_emitted_as_names_and_accepted_as_numbers(api):
    exp_id = api.experiment()
    run = api.run(exp_id)
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "RUNNING"
    assert run["info"]["lifecycle_stage"] == "active"
    updated = api.ok(api.post("/runs/update", {"run_id": run_id, "status": 3}))["run_info"]
    assert updated["status"] == "FINISHED"
    updated = api.ok(api.post("/runs/update", {"run_id": run_id, "status": "KILLED"}))["run_info"]
    assert updated["status"] == "KILLED"
    assert_error(
        api.post("/runs/update", {"run_id": run_id, "status": "EXPLODED"}), 400, "INVALID_PARAMETER_VALUE"
    )
    assert api.get_run(run_id)["info"]["status"] == "KILLED"

    api.ok(api.post("/runs/delete", {"run_id": run_id}))
    for view in (2, "DELETED_ONLY", 3, "ALL"):
        found = api.ok(api.post("/runs/search", {"experiment_ids": [exp_id], "run_view_type": view}))
        assert [r["info"]["run_id"] for r in found["runs"]] == [run_id], view
    for view in (1, "ACTIVE_ONLY"):
        assert api.ok(api.post("/runs/search", {"experiment_ids": [exp_id], "run_view_type": view})) == {}
    # GET: an enum number arrives as text
    found = api.ok(
        api.get(
            "/experiments/search",
            {"max_results": "5", "view_type": "3", "filter": f"experiment_id = '{exp_id}'"},
        )
    )
    assert [e["experiment_id"] for e in found["experiments"]] == [exp_id]

    model = api.ok(api.post("/logged-models", {"experiment_id": exp_id, "name": "enum_model"}))["model"]
    assert model["info"]["status"] == "LOGGED_MODEL_PENDING"
    model_id = model["info"]["model_id"]
    done = api.ok(
        api.request("PATCH", f"/logged-models/{model_id}", json={"model_id": model_id, "status": 2})
    )
    assert done["model"]["info"]["status"] == "LOGGED_MODEL_READY"


def test_camel_case_names_accepted_but_not_both_spellings(api):
    run_id = api.run(api.experiment())["info"]["run_id"]
    api.ok(api.post("/runs/log-parameter", {"runId": run_id, "key": "camel", "value": "yes"}))
    api.ok(
        api.post("/runs/log-metric", {"runId": run_id, "key": "cm", "value": 1.0, "timestamp": 1, "step": 0})
    )
    history = api.ok(api.get("/metrics/get-history", {"runId": run_id, "metricKey": "cm"}))
    assert [m["value"] for m in history["metrics"]] == [1.0]
    message = assert_error(
        api.post("/runs/log-parameter", {"run_id": run_id, "runId": run_id, "key": "both", "value": "no"}),
        400,
        "INVALID_PARAMETER_VALUE",
    )
    assert "run_id" in message or "runId" in message
    assert_error(
        api.post(
            "/runs/log-metric",
            {"run_id": run_id, "runId": run_id, "key": "both_m", "value": 1.0, "timestamp": 1, "step": 0},
        ),
        400,
        "INVALID_PARAMETER_VALUE",
    )
    assert_error(
        api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "cm", "metricKey": "cm"}),
        400,
        "INVALID_PARAMETER_VALUE",
    )
    run = api.get_run(run_id)
    assert params_of(run) == {"camel": "yes"}
    assert [m["key"] for m in run["data"]["metrics"]] == ["cm"]


def test_double_encoded_and_empty_bodies(api):
    name = unique("double")
    body = json.dumps(json.dumps({"name": name}))  # a JSON string holding JSON, as old clients sent
    response = api.http.post(
        f"{api.url}{API}/experiments/create",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    exp_id = api.ok(response)["experiment_id"]
    assert api.ok(api.get("/experiments/get", {"experiment_id": exp_id}))["experiment"]["name"] == name
    empty = api.http.post(
        f"{api.url}{API}/runs/search", data=b"", headers={"Content-Type": "application/json"}, timeout=60
    )
    assert api.ok(empty) == {}


# ------------------------------------------------------------------------------------------------------
# empty answers, page tokens
# ------------------------------------------------------------------------------------------------------


def test_empty_results_are_empty_objects(api):
    exp_id = api.experiment()
    assert api.ok(api.post("/runs/search", {"experiment_ids": [exp_id]})) == {}
    assert api.ok(api.post("/runs/search", {"experiment_ids": []})) == {}
    assert (
        api.ok(api.post("/experiments/search", {"max_results": 10, "filter": f"name = '{unique('none')}'"}))
        == {}
    )
    run_id = api.run(exp_id)["info"]["run_id"]
    assert api.ok(api.get("/metrics/get-history", {"run_id": run_id, "metric_key": "never"})) == {}
    assert api.ok(api.post("/logged-models/search", {"experiment_ids": [exp_id]})) == {}
    listed = api.http.get(
        f"{api.url}{ARTIFACTS}", params={"path": f"{exp_id}/{run_id}/artifacts"}, timeout=60
    )
    assert api.ok(listed) == {}
    # void RPCs answer {}
    assert api.ok(api.post("/runs/set-tag", {"run_id": run_id, "key": "t", "value": "v"})) == {}


def test_next_page_token_absent_on_the_last_page(api):
    exp_id = api.experiment()
    for i in range(4):
        api.run(exp_id, run_name=f"p{i}", start_time=1_000 + i)
    query = {"experiment_ids": [exp_id], "max_results": 3, "order_by": ["attributes.start_time ASC"]}
    first = api.ok(api.post("/runs/search", query))
    assert [r["info"]["run_name"] for r in first["runs"]] == ["p0", "p1", "p2"]
    second = api.ok(api.post("/runs/search", {**query, "page_token": first["next_page_token"]}))
    assert [r["info"]["run_name"] for r in second["runs"]] == ["p3"]
    assert "next_page_token" not in second
    # exactly one full page: no token either
    exact = api.ok(api.post("/runs/search", {**query, "max_results": 4}))
    assert len(exact["runs"]) == 4 and "next_page_token" not in exact
    # experiments too
    prefix = unique("pages")
    for s in "abc":
        api.ok(api.post("/experiments/create", {"name": f"{prefix}-{s}"}))
    q = {"max_results": 2, "filter": f"name LIKE '{prefix}-%'", "order_by": ["name ASC"]}
    page1 = api.ok(api.post("/experiments/search", q))
    page2 = api.ok(api.post("/experiments/search", {**q, "page_token": page1["next_page_token"]}))
    assert [e["name"][-1] for e in page1["experiments"] + page2["experiments"]] == ["a", "b", "c"]
    assert "next_page_token" not in page2


# ------------------------------------------------------------------------------------------------------
# infrastructure routes and the error envelope
# ------------------------------------------------------------------------------------------------------


def test_health_version_and_server_info(api):
    health = api.http.get(f"{api.url}/health", timeout=10)
    assert (health.status_code, health.text) == (200, "OK")
    version = api.http.get(f"{api.url}/version", timeout=10)
    assert version.status_code == 200
    assert re.fullmatch(r"3\.\d+\.\d+", version.text.strip()), version.text
    info = api.http.get(f"{api.url}/api/3.0/mlflow/server-info", timeout=10)
    assert info.headers["content-type"].startswith("application/json")
    body = api.ok(info)
    assert body["artifact_serving_enabled"] is True
    assert body["multipart_uploads_enabled"] is False
    assert body["multipart_downloads_enabled"] is False
    assert isinstance(body["store_type"], str)


@pytest.mark.parametrize(
    "path",
    [
        "/api/2.0/mlflow/runs/no-such-route",
        "/api/2.0/mlflow/nope",
        "/ajax-api/2.0/mlflow/experiments/nope",
        "/totally/unknown",
        "/api/9.9/x",
    ],
)
def test_unknown_routes_answer_json_endpoint_not_found(api, path):
    for method in ("GET", "POST"):
        response = api.http.request(method, f"{api.url}{path}", json={}, timeout=10)
        assert_error(response, 404, "ENDPOINT_NOT_FOUND")


def test_wrong_method_is_rejected_with_json(api):
    response = api.http.get(f"{api.url}{API}/runs/create", timeout=10)
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text


def test_post_requires_json_content_type(api):
    name = unique("ctype")
    body = json.dumps({"name": name})
    for headers in (
        {},
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        response = api.http.post(
            f"{api.url}{API}/experiments/create", data=body.encode(), headers=headers, timeout=10
        )
        message = assert_error(response, 400, "INVALID_PARAMETER_VALUE")
        assert "Content-Type" in message
    assert_error(
        api.get("/experiments/get-by-name", {"experiment_name": name}), 404, "RESOURCE_DOES_NOT_EXIST"
    )
    ok = api.http.post(
        f"{api.url}{API}/experiments/create",
        data=body.encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
        timeout=10,
    )
    assert api.ok(ok)["experiment_id"]


# ------------------------------------------------------------------------------------------------------
# run names, lifecycle rules
# ------------------------------------------------------------------------------------------------------


def test_run_name_generated_and_kept_in_sync_with_the_tag(api):
    exp_id = api.experiment()
    generated = api.run(exp_id)
    name = generated["info"]["run_name"]
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d+", name), name
    assert tags_of(generated)["mlflow.runName"] == name
    other = api.run(exp_id)["info"]["run_name"]
    assert other and re.fullmatch(r"[a-z]+-[a-z]+-\d+", other)

    by_field = api.run(exp_id, run_name="from-field")
    assert tags_of(by_field)["mlflow.runName"] == "from-field"
    by_tag = api.run(exp_id, tags=[{"key": "mlflow.runName", "value": "from-tag"}])
    assert by_tag["info"]["run_name"] == "from-tag"
    both = api.run(exp_id, run_name="same", tags=[{"key": "mlflow.runName", "value": "same"}])
    assert (both["info"]["run_name"], tags_of(both)["mlflow.runName"]) == ("same", "same")

    before = api.ok(api.post("/runs/search", {"experiment_ids": [exp_id]}))["runs"]
    message = assert_error(
        api.post(
            "/runs/create",
            {"experiment_id": exp_id, "run_name": "a", "tags": [{"key": "mlflow.runName", "value": "b"}]},
        ),
        400,
        "INVALID_PARAMETER_VALUE",
    )
    assert "run_name" in message or "mlflow.runName" in message
    after = api.ok(api.post("/runs/search", {"experiment_ids": [exp_id]}))["runs"]
    assert len(after) == len(before)  # nothing created

    run_id = by_field["info"]["run_id"]
    info = api.ok(api.post("/runs/update", {"run_id": run_id, "run_name": "updated"}))["run_info"]
    assert info["run_name"] == "updated"
    assert tags_of(api.get_run(run_id))["mlflow.runName"] == "updated"
    assert api.get_run(run_id)["info"]["status"] == "RUNNING"  # update without status leaves it alone

    api.ok(api.post("/runs/set-tag", {"run_id": run_id, "key": "mlflow.runName", "value": "via-set-tag"}))
    assert api.get_run(run_id)["info"]["run_name"] == "via-set-tag"
    api.ok(
        api.post(
            "/runs/log-batch", {"run_id": run_id, "tags": [{"key": "mlflow.runName", "value": "via-batch"}]}
        )
    )
    run = api.get_run(run_id)
    assert (run["info"]["run_name"], tags_of(run)["mlflow.runName"]) == ("via-batch", "via-batch")
    found = api.ok(
        api.post("/runs/search", {"experiment_ids": [exp_id], "filter": "attributes.run_name = 'via-batch'"})
    )
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]

    api.ok(api.post("/runs/delete-tag", {"run_id": run_id, "key": "mlflow.runName"}))
    run = api.get_run(run_id)
    assert "mlflow.runName" not in tags_of(run) and run["info"]["run_name"] == "via-batch"


def test_get_by_name_returns_deleted_experiments(api):
    name = unique("deleted")
    exp_id = api.ok(api.post("/experiments/create", {"name": name}))["experiment_id"]
    api.ok(api.post("/experiments/delete", {"experiment_id": exp_id}))
    experiment = api.ok(api.get("/experiments/get-by-name", {"experiment_name": name}))["experiment"]
    assert (experiment["experiment_id"], experiment["lifecycle_stage"]) == (exp_id, "deleted")
    assert (
        api.ok(api.get("/experiments/get", {"experiment_id": exp_id}))["experiment"]["lifecycle_stage"]
        == "deleted"
    )
    assert_error(api.post("/experiments/create", {"name": name}), 400, "RESOURCE_ALREADY_EXISTS")
    assert_error(
        api.get("/experiments/get-by-name", {"experiment_name": unique("never")}),
        404,
        "RESOURCE_DOES_NOT_EXIST",
    )


def test_writes_to_a_deleted_run_are_rejected(api):
    exp_id = api.experiment()
    run_id = api.run(exp_id)["info"]["run_id"]
    api.ok(api.post("/runs/delete", {"run_id": run_id}))
    writes = [
        ("/runs/log-metric", {"run_id": run_id, "key": "m", "value": 1.0, "timestamp": 1, "step": 0}),
        ("/runs/log-parameter", {"run_id": run_id, "key": "p", "value": "v"}),
        ("/runs/set-tag", {"run_id": run_id, "key": "t", "value": "v"}),
        (
            "/runs/log-batch",
            {
                "run_id": run_id,
                "metrics": [{"key": "m", "value": 1.0, "timestamp": 1, "step": 0}],
                "params": [{"key": "p", "value": "v"}],
                "tags": [{"key": "t", "value": "v"}],
            },
        ),
        ("/runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": 5}),
    ]
    for path, body in writes:
        message = assert_error(api.post(path, body), 400, "INVALID_PARAMETER_VALUE")
        assert run_id in message and "active" in message, (path, message)
    run = api.get_run(run_id)
    assert run["info"]["lifecycle_stage"] == "deleted"
    assert run["info"]["status"] == "RUNNING" and "end_time" not in run["info"]
    assert "metrics" not in run["data"] and "params" not in run["data"] and "t" not in tags_of(run)

    # a run of a deleted experiment is read-only too
    run2 = api.run(exp_id)["info"]["run_id"]
    api.ok(api.post("/experiments/delete", {"experiment_id": exp_id}))
    assert_error(
        api.post("/runs/log-parameter", {"run_id": run2, "key": "p", "value": "v"}),
        400,
        "INVALID_PARAMETER_VALUE",
    )
    assert_error(api.post("/runs/create", {"experiment_id": exp_id}), 400, "INVALID_PARAMETER_VALUE")
    api.ok(api.post("/experiments/restore", {"experiment_id": exp_id}))
    api.ok(api.post("/runs/log-parameter", {"run_id": run2, "key": "p", "value": "v"}))
    assert params_of(api.get_run(run2)) == {"p": "v"}


# ------------------------------------------------------------------------------------------------------
# the artifact proxy on the wire
# ------------------------------------------------------------------------------------------------------


def test_artifact_proxy_put_get_list_delete(api):
    exp_id = api.experiment()
    run = api.run(exp_id)
    root = f"{exp_id}/{run['info']['run_id']}/artifacts"
    assert run["info"]["artifact_uri"] == f"mlflow-artifacts:/{root}"
    payload = bytes(range(256)) * 100
    put = api.http.put(
        f"{api.url}{ARTIFACTS}/{root}/deep/er/blob.bin",
        data=payload,
        headers={"Content-Type": "application/x-whatever"},
        timeout=60,
    )
    assert put.status_code == 200, put.text
    api.http.put(
        f"{api.url}{ARTIFACTS}/{root}/top.txt",
        data=b"top",
        headers={"Content-Type": "text/plain"},
        timeout=60,
    ).raise_for_status()

    got = api.http.get(f"{api.url}{ARTIFACTS}/{root}/deep/er/blob.bin", timeout=60)
    assert got.status_code == 200 and got.content == payload
    listing = api.ok(api.http.get(f"{api.url}{ARTIFACTS}", params={"path": root}, timeout=60))
    assert sorted(listing["files"], key=lambda f: f["path"]) == [
        {"path": "deep", "is_dir": True},
        {"path": "top.txt", "is_dir": False, "file_size": 3},
    ]
    deeper = api.ok(api.http.get(f"{api.url}{ARTIFACTS}", params={"path": f"{root}/deep/er"}, timeout=60))
    assert deeper == {"files": [{"path": "blob.bin", "is_dir": False, "file_size": len(payload)}]}
    # listing a file's path answers {}: the client then downloads it as a file
    assert api.ok(api.http.get(f"{api.url}{ARTIFACTS}", params={"path": f"{root}/top.txt"}, timeout=60)) == {}

    deleted = api.http.delete(f"{api.url}{ARTIFACTS}/{root}/top.txt", timeout=60)
    assert deleted.status_code == 200, deleted.text
    assert_error(
        api.http.get(f"{api.url}{ARTIFACTS}/{root}/top.txt", timeout=60), 404, "RESOURCE_DOES_NOT_EXIST"
    )
    listing = api.ok(api.http.get(f"{api.url}{ARTIFACTS}", params={"path": root}, timeout=60))
    assert listing == {"files": [{"path": "deep", "is_dir": True}]}


def test_oversized_json_body_is_refused_with_413(server):
    body = b'{"name": "' + b"x" * (64 * 2**20 + 10) + b'"}'
    r = requests.post(f"{server.url}{API}/experiments/create", data=body,
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
