"""MLflow search grammar: parser units, execution against a real (embedded SQLite) database, and compiled
SQL for every dialect (values are bound parameters, never text)."""

from __future__ import annotations

import base64
import json

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql, mysql, postgresql, sqlite

from server.errors import RunyardError
from server.store import schema, search
from server.store.uri import create_engine

# ---------------------------------------------------------------------------------------------------------
# Data: one small database shared by the module's read-only queries.

# experiment id, workspace, name, lifecycle, created, last update
EXPERIMENTS = [
    (1, "default", "probe-one", "active", 100, 150),
    (2, "default", "probe-Two", "active", 200, 250),
    (3, "default", "other", "active", None, 50),
    (4, "default", "probe-deleted", "deleted", 300, 300),
    (5, "team", "probe-one", "active", 400, 400),
]
EXPERIMENT_TAGS = [(1, "owner", "Ann"), (2, "owner", "ann"), (2, "my tag", "x")]
# run id: experiment, name, user, status, start, end, lifecycle
RUNS = {
    "a1": (1, "Alpha", "alice", "FINISHED", 100, 200, "active"),
    "b2": (1, "beta", "bob", "RUNNING", 300, None, "active"),
    "c3": (1, "Gamma", "alice", "FAILED", 200, 250, "active"),
    "d4": (1, None, None, "FINISHED", None, None, "active"),
    "e5": (1, "deleted", "eve", "FINISHED", 400, None, "deleted"),
    "f6": (2, "elsewhere", "fay", "FINISHED", 500, None, "active"),
    "g7": (1, "alpha", "gus", "KILLED", 100, None, "active"),
}
NAN = object()
METRICS = {("a1", "loss"): 0.5, ("a1", "acc"): 0.9, ("b2", "loss"): 0.2, ("c3", "loss"): NAN,
           ("c3", "acc"): 0.5, ("e5", "loss"): 0.1, ("f6", "loss"): 1.0, ("g7", "loss"): 0.7}
PARAMS = {("a1", "lr"): "0.01", ("a1", "opt"): "adam", ("b2", "lr"): "0.1", ("c3", "opt"): "sgd",
          ("g7", "opt"): "ADAM"}
TAGS = {("a1", "team"): "Core", ("b2", "team"): "core", ("d4", "team"): "x", ("c3", "my tag"): "v"}
DATASETS = [("ds1", 1, "train-df", "abc", "code", "{}"), ("ds2", 1, "eval", "def", "code", "{}")]
# input id, dataset, destination type, destination id, context tag
INPUTS = [("i1", "ds1", "RUN", "a1", "training"), ("i2", "ds2", "RUN", "b2", "eval"),
          ("i3", "ds1", "RUN", "c3", None), ("i4", "ds2", "MODEL_INPUT", "d4", "eval")]
# model id: experiment, name, created, updated, status, lifecycle, model_type, source_run_id
MODELS = {
    "m1": (1, "model-a", 100, 150, 2, "active", "agent", "a1"),
    "m2": (1, "model-B", 200, 250, 1, "active", None, "b2"),
    "m3": (1, "other", 300, 300, 3, "active", None, None),
    "m4": (1, "model-gone", 400, 400, 2, "deleted", None, None),
    "m5": (2, "model-a", 500, 500, 2, "active", None, None),
}
MODEL_PARAMS = [("m1", "lr", 1, "0.01"), ("m2", "lr", 1, "0.1")]
MODEL_TAGS = [("m1", "env", 1, "prod"), ("m2", "env", 1, "Prod")]
# model, name, timestamp, step, run, value, experiment, dataset name, digest
MODEL_METRICS = [
    ("m1", "acc", 1, 0, "a1", 0.5, 1, "eval", "d1"),
    ("m1", "acc", 2, 1, "a1", 0.9, 1, "eval", "d1"),
    ("m1", "loss", 1, 0, "a1", 0.3, 1, "train", "t1"),
    ("m2", "acc", 5, 0, "b2", 0.7, 1, "test", "x1"),
]


def _insert(conn: sa.Connection, table: sa.Table, columns: str, rows) -> None:
    conn.execute(table.insert(), [dict(zip(columns.split(), row, strict=True)) for row in rows])


def _seed(conn: sa.Connection) -> None:
    _insert(conn, schema.experiments,
            "experiment_id workspace name lifecycle_stage creation_time last_update_time", EXPERIMENTS)
    _insert(conn, schema.experiment_tags, "experiment_id key value", EXPERIMENT_TAGS)
    _insert(conn, schema.runs,
            "run_uuid experiment_id name user_id status start_time end_time lifecycle_stage artifact_uri",
            [(rid, *row, f"mlflow-artifacts:/{row[0]}/{rid}/artifacts") for rid, row in RUNS.items()])
    _insert(conn, schema.latest_metrics, "run_uuid key value timestamp step is_nan",
            [(r, k, 0.0 if v is NAN else v, 1, 0, v is NAN) for (r, k), v in METRICS.items()])
    _insert(conn, schema.params, "run_uuid key value", [(r, k, v) for (r, k), v in PARAMS.items()])
    _insert(conn, schema.run_tags, "run_uuid key value", [(r, k, v) for (r, k), v in TAGS.items()])
    _insert(conn, schema.datasets, "dataset_uuid experiment_id name digest source_type source", DATASETS)
    _insert(conn, schema.inputs, "input_uuid source_type source_id destination_type destination_id",
            [(i, "DATASET", ds, dt, dest) for i, ds, dt, dest, _ in INPUTS])
    _insert(conn, schema.input_tags, "input_uuid name value",
            [(i, "mlflow.data.context", ctx) for i, _, _, _, ctx in INPUTS if ctx])
    _insert(conn, schema.logged_models,
            "model_id experiment_id name creation_timestamp_ms last_updated_timestamp_ms status "
            "lifecycle_stage model_type source_run_id artifact_location",
            [(m, *row, f"/a/{m}") for m, row in MODELS.items()])
    _insert(conn, schema.logged_model_params, "model_id param_key experiment_id param_value", MODEL_PARAMS)
    _insert(conn, schema.logged_model_tags, "model_id tag_key experiment_id tag_value", MODEL_TAGS)
    _insert(conn, schema.logged_model_metrics, "model_id metric_name metric_timestamp_ms metric_step run_id "
            "metric_value experiment_id dataset_name dataset_digest", MODEL_METRICS)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = create_engine(str(tmp_path_factory.mktemp("search-db")))
    schema.metadata.create_all(engine)
    with engine.begin() as conn:
        _seed(conn)
    yield engine
    engine.dispose()


def run_ids(engine, filter_string=None, order_by=None, view="ACTIVE_ONLY", experiments=(1,), offset=0,
            limit=100):
    stmt = search.runs_query(list(experiments), filter_string, view, order_by, offset, limit)
    with engine.connect() as conn:
        return [row.run_uuid for row in conn.execute(stmt)]


def experiment_ids(engine, filter_string=None, order_by=None, view="ACTIVE_ONLY", offset=0, limit=100,
                   workspace="default"):
    stmt = search.experiments_query(filter_string, view, order_by, offset, limit, workspace=workspace)
    with engine.connect() as conn:
        return [row.experiment_id for row in conn.execute(stmt)]


def model_ids(engine, filter_string=None, datasets=None, order_by=None, experiments=(1,), offset=0,
              limit=100):
    stmt = search.logged_models_query(list(experiments), filter_string, datasets, order_by, offset, limit)
    with engine.connect() as conn:
        return [row.model_id for row in conn.execute(stmt)]


def assert_invalid(excinfo, *fragments):
    assert excinfo.value.error_code == "INVALID_PARAMETER_VALUE"
    for fragment in fragments:
        assert fragment in excinfo.value.message


# ---------------------------------------------------------------------------------------------------------
# Parser units


@pytest.mark.parametrize("filter_string, entity, key, comparator, value", [
    ("metrics.loss < 1", "metric", "loss", "<", 1),
    ("metric.loss >= 0.5", "metric", "loss", ">=", 0.5),
    ("params.lr = '0.01'", "param", "lr", "=", "0.01"),
    ("param.lr != '0.01'", "param", "lr", "!=", "0.01"),
    ("parameter.lr LIKE '0.%'", "param", "lr", "LIKE", "0.%"),
    ("parameters.lr ILIKE '0.%'", "param", "lr", "ILIKE", "0.%"),
    ("tags.team IS NULL", "tag", "team", "IS NULL", None),
    ("tag.team is not null", "tag", "team", "IS NOT NULL", None),
    ("attributes.status = 'FINISHED'", "attribute", "status", "=", "FINISHED"),
    ("attribute.user_id = 'al'", "attribute", "user_id", "=", "al"),
    ("attr.artifact_uri LIKE 's3:%'", "attribute", "artifact_uri", "LIKE", "s3:%"),
    ("run.run_id = 'abc'", "attribute", "run_id", "=", "abc"),
    ("run_name = 'x'", "attribute", "run_name", "=", "x"),
    ("`run name` = 'x'", "attribute", "run name", "=", "x"),
    ('"Run name" = \'x\'', "attribute", "Run name", "=", "x"),
    ("attributes.`Run Name` = 'x'", "attribute", "Run Name", "=", "x"),
    ("created > 5", "attribute", "created", ">", 5),
    ("Created > 5", "attribute", "Created", ">", 5),
    ("end_time <= 7", "attribute", "end_time", "<=", 7),
    ("run_id in ('a', \"b\",)", "attribute", "run_id", "IN", ("a", "b")),
    ("run_id NOT IN ('a')", "attribute", "run_id", "NOT IN", ("a",)),
    ("datasets.name = 'train'", "dataset", "name", "=", "train"),
    ("dataset.digest IN ('a', 'b')", "dataset", "digest", "IN", ("a", "b")),
    ("datasets.context not in ('eval')", "dataset", "context", "NOT IN", ("eval",)),
])
def test_parse_and_resolve_every_alias(filter_string, entity, key, comparator, value):
    [clause] = search.parse_filter(filter_string)
    resolved = search.resolve(search.RUNS, clause)
    assert (resolved.entity, resolved.key, resolved.comparator, resolved.value) == (entity, key, comparator,
                                                                                      value)


@pytest.mark.parametrize("filter_string, prefix, key, value", [
    ("metrics.`my metric` > 1", "metrics", "my metric", 1),
    ('metrics."my metric" > 1', "metrics", "my metric", 1),
    ("tags.mlflow.runName = 'x'", "tags", "mlflow.runName", "x"),
    ("tags.mlflow.`odd key` = 'x'", "tags", "mlflow.odd key", "x"),
    ("metrics.2nd_loss > 1", "metrics", "2nd_loss", 1),
    ("metrics.`a-b/c:d` > 1", "metrics", "a-b/c:d", 1),
    ("metrics.`tick``s` > 1", "metrics", "tick`s", 1),
    ("params.précision = 'x'", "params", "précision", "x"),
    ("params.a = \"double\"", "params", "a", "double"),
    ("params.a = 'it''s'", "params", "a", "it's"),
    ("params.a = \"say \"\"hi\"\"\"", "params", "a", 'say "hi"'),
    ("params.a = 'with \"inner\" quotes'", "params", "a", 'with "inner" quotes'),
    ("params.a = ''", "params", "a", ""),
    ("params.a = 'x AND y'", "params", "a", "x AND y"),
    ("metrics.m > -1", "metrics", "m", -1),
    ("metrics.m > +2.5", "metrics", "m", 2.5),
    ("metrics.m > .5", "metrics", "m", 0.5),
    ("metrics.m > 1e3", "metrics", "m", 1000.0),
    ("metrics.m > 1.5E-2", "metrics", "m", 0.015),
    ("metrics.m>=1", "metrics", "m", 1),
])
def test_parse_quoting_and_literals(filter_string, prefix, key, value):
    [clause] = search.parse_filter(filter_string)
    assert (clause.ident.prefix, clause.ident.key, clause.value) == (prefix, key, value)
    assert type(clause.value) is type(value)


@pytest.mark.parametrize("filter_string", [
    "metrics.a > 1 AND params.b = 'x'",
    "metrics.a > 1 and params.b = 'x'",
    "metrics.a > 1 AnD params.b = 'x'",
    "  metrics.a>1\n\tAND\n params.b='x'  ",
])
def test_and_is_case_and_whitespace_insensitive(filter_string):
    clauses = search.parse_filter(filter_string)
    assert [(c.ident.key, c.comparator, c.value) for c in clauses] == [("a", ">", 1), ("b", "=", "x")]


@pytest.mark.parametrize("filter_string", [None, "", "   ", "\n"])
def test_empty_filter_has_no_clauses(filter_string):
    assert search.parse_filter(filter_string) == []


@pytest.mark.parametrize("text, prefix, key, ascending", [
    ("metrics.loss", "metrics", "loss", True),
    ("metrics.`my metric` DESC", "metrics", "my metric", False),
    ("params.lr asc", "params", "lr", True),
    ("start_time desc", None, "start_time", False),
    ('tags."a b"  DESC ', "tags", "a b", False),
])
def test_parse_order_by(text, prefix, key, ascending):
    ident, asc = search.parse_order_by(text)
    assert (ident.prefix, ident.key, asc) == (prefix, key, ascending)


BAD_RUN_FILTERS = [
    ("metrics.loss >>> 1", "Invalid comparator '>>>' not one of"),
    ("metrics.loss == 1", "Invalid comparator '=='"),
    ("metrics.loss LIKE 1", "Invalid comparator 'LIKE'"),
    ("metrics.loss IS NULL", "Invalid comparator 'IS NULL'"),
    ("params.lr > '1'", "Invalid comparator '>'"),
    ("params.lr IN ('1')", "Invalid comparator 'IN'"),
    ("tags.t < 'a'", "Invalid comparator '<'"),
    ("status IN ('FINISHED')", "Invalid comparator 'IN'"),
    ("start_time LIKE '1%'", "Invalid comparator 'LIKE'"),
    ("run_name IS NULL", "Invalid comparator 'IS NULL'"),
    ("tags.t NOT LIKE 'a'", "Invalid comparator 'LIKE'"),
    ("tags.t BETWEEN 'a'", "Invalid comparator 'BETWEEN'"),
    ("foo = 'a'", "Invalid attribute key 'foo' specified. Valid keys are"),
    ("attributes.Run_Id = 'a'", "Invalid attribute key 'Run_Id'"),
    ("bogus.key = 'a'", "Invalid entity type 'bogus'"),
    ("datasets.source = 'a'", "Invalid dataset key 'source'"),
    ("metrics.loss > 'a'", "Expected a numeric value for 'metrics.loss'"),
    ("start_time > '5'", "Expected a numeric value for 'start_time'"),
    ("params.lr = 0.01", "Expected a quoted string value for 'params.lr'"),
    ("status = 1", "Expected a quoted string value for 'status'"),
    ("run_id IN ('a', 1)", "Expected a quoted string value for 'run_id'"),
    ("params.lr = abc", "Expected a quoted string or a number, found 'abc'"),
    ("params.lr = `abc`", "Expected a quoted string or a number"),
    ("run_id IN ()", "must not be empty"),
    ("run_id IN 'a'", "Expected a list such as"),
    ("run_id IN ('a' 'b')", "Expected ',' or ')'"),
    ("run_id = ('a')", "only allowed after IN"),
    ("metrics.a > 1 OR metrics.b > 1", "OR is not supported"),
    ("metrics.a > 1 or metrics.b > 1", "OR is not supported"),
    ("(metrics.a > 1)", "Parentheses grouping is not supported"),
    ("metrics.a > 1 AND (metrics.b > 1)", "Parentheses grouping is not supported"),
    ("metrics.a > 1 metrics.b > 2", "Expected AND between clauses"),
    ("metrics.a > 1 AND", "Expected an identifier"),
    ("AND metrics.a > 1", "Invalid comparator 'metrics'"),
    ("metrics.a > 1 AND AND metrics.b > 1", "Invalid comparator"),
    ("metrics.a >", "Expected a quoted string or a number, found the end"),
    ("metrics.a", "Expected a comparator"),
    ("tags.t IS 'x'", "Expected NULL after IS"),
    ("params.a = 'unterminated", "Unterminated string"),
    ("params.`a = 'x'", "Unterminated backquoted name"),
    ("metrics.loss-val > 1", "Invalid character '-'"),
    ("metrics.a > 1;", "Invalid character ';'"),
    ("metrics. > 1", "Expected an identifier"),
    ("metrics.`` > 1", "Missing key after 'metrics.'"),
    ("'a' = 'a'", "Expected an identifier"),
    ("= 1", "Expected an identifier"),
]


@pytest.mark.parametrize("filter_string, message", BAD_RUN_FILTERS)
def test_bad_run_filters_are_invalid_parameter_values(filter_string, message):
    with pytest.raises(RunyardError) as excinfo:
        search.runs_query([1], filter_string, "ACTIVE_ONLY", None, 0, 10)
    assert_invalid(excinfo, message)


@pytest.mark.parametrize("order_by, message", [
    (["metrics.loss SIDEWAYS"], "Expected ASC or DESC"),
    (["metrics.loss ASC extra"], "Expected ASC or DESC"),
    (["foo"], "Invalid attribute key 'foo'"),
    (["bogus.x"], "Invalid entity type 'bogus'"),
    (["datasets.name"], "cannot order by dataset"),
    ([""], "Invalid order_by clause"),
    ([None], "Invalid order_by clause"),
    (["metrics.loss", "metric.loss DESC"], "already listed"),
    (["created", "start_time DESC"], "already listed"),
    (["metrics.loss >"], "Expected ASC or DESC"),
])
def test_bad_run_order_by(order_by, message):
    with pytest.raises(RunyardError) as excinfo:
        search.runs_query([1], None, "ACTIVE_ONLY", order_by, 0, 10)
    assert_invalid(excinfo, message)


def test_bad_view_type_and_paging():
    with pytest.raises(RunyardError) as excinfo:
        search.runs_query([1], None, "SOME", None, 0, 10)
    assert_invalid(excinfo, "Invalid view type 'SOME'")
    with pytest.raises(RunyardError) as excinfo:
        search.runs_query([1], None, "ALL", None, -1, 10)
    assert_invalid(excinfo, "must not be negative")


# ---------------------------------------------------------------------------------------------------------
# Page tokens


def test_page_token_round_trip_and_mlflow_format():
    assert search.encode_page_token(2) == "eyJvZmZzZXQiOiAyfQ=="  # what the stock server sends
    for offset in (0, 1, 1000, 10**12):
        assert search.decode_page_token(search.encode_page_token(offset)) == offset
    assert search.decode_page_token(None) == 0
    assert search.decode_page_token("") == 0
    # MLflow's logged-model tokens carry more fields; the offset is what we read.
    mlflow_token = base64.b64encode(json.dumps({"experiment_ids": ["1"], "offset": 7}).encode()).decode()
    assert search.decode_page_token(mlflow_token) == 7


def _b64(obj) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


@pytest.mark.parametrize("token", [
    "garbage!!", "eyJvZmZzZXQiOiAy", "////", _b64([1]), _b64({"offset": -1}), _b64({"offset": "3"}),
    _b64({"offset": 1.5}), _b64({"offset": True}), _b64({"nope": 1}), base64.b64encode(b"\xff\xfe").decode(),
])
def test_bad_page_tokens(token):
    with pytest.raises(RunyardError) as excinfo:
        search.decode_page_token(token)
    assert_invalid(excinfo, "Invalid page token")


# ---------------------------------------------------------------------------------------------------------
# Runs on a real database

DEFAULT_ORDER = ["b2", "c3", "a1", "g7", "d4"]  # start_time DESC (missing last), then run id


@pytest.mark.parametrize("filter_string, expected", [
    (None, DEFAULT_ORDER),
    ("metrics.loss < 0.6", ["b2", "a1"]),                  # NaN (stored as 0) does not match
    ("metrics.loss = 0", []),
    ("metrics.loss != 0.5", ["b2", "c3", "g7"]),           # NaN != 0.5 (IEEE, as MLflow); missing never
    ("metric.acc >= 0.5", ["c3", "a1"]),
    ("metrics.`loss` > 0.3", ["a1", "g7"]),
    ('metrics."loss" <= 0.2', ["b2"]),
    ("metrics.missing > 0", []),
    ("params.lr = '0.01'", ["a1"]),
    ("param.lr != '0.01'", ["b2"]),                        # runs without the param do not match !=
    ("parameter.opt LIKE 'a%'", ["a1"]),                   # LIKE is case-sensitive
    ("parameters.opt ILIKE 'a%'", ["a1", "g7"]),
    ("params.opt = 'ADAM'", ["g7"]),
    ("params.opt IS NULL", ["b2", "d4"]),
    ("params.opt IS NOT NULL", ["c3", "a1", "g7"]),
    ("tags.team = 'core'", ["b2"]),
    ("tag.team ILIKE 'CORE'", ["b2", "a1"]),
    ("tags.team LIKE 'C%'", ["a1"]),
    ("tags.team != 'x'", ["b2", "a1"]),
    ("tags.team IS NULL", ["c3", "g7"]),
    ("tags.`my tag` = 'v'", ["c3"]),
    ('tags."my tag" = "v"', ["c3"]),
    ("attributes.run_name = 'Alpha'", ["a1"]),
    ("run_name LIKE 'a%'", ["g7"]),
    ("run_name ILIKE 'a%'", ["a1", "g7"]),
    ("run_name != 'beta'", ["c3", "a1", "g7"]),            # NULL name does not match
    ("`Run Name` = 'beta'", ["b2"]),
    ('"run name" = \'beta\'', ["b2"]),
    ("attr.status = 'FINISHED'", ["a1", "d4"]),
    ("run.user_id = 'alice'", ["c3", "a1"]),
    ("attribute.artifact_uri LIKE '%/a1/%'", ["a1"]),
    ("run_id = 'c3'", ["c3"]),
    ("run_id IN ('a1', 'c3', 'f6')", ["c3", "a1"]),
    ("run_id NOT IN ('a1','c3')", ["b2", "g7", "d4"]),
    ("attributes.start_time >= 200", ["b2", "c3"]),
    ("created < 200", ["a1", "g7"]),
    ("Created = 300", ["b2"]),
    ("end_time > 0", ["c3", "a1"]),
    ("start_time > 150 AND params.lr = '0.1'", ["b2"]),
    ("metrics.loss < 1 and params.opt = 'adam' AND tags.team = 'Core'", ["a1"]),
    ("datasets.name = 'train-df'", ["c3", "a1"]),
    ("dataset.digest = 'def'", ["b2"]),
    ("datasets.name IN ('eval', 'nope')", ["b2"]),         # d4's MODEL_INPUT link is not a run input
    ("datasets.name NOT IN ('eval')", ["c3", "a1"]),
    ("datasets.name LIKE 'T%'", []),
    ("datasets.name ILIKE 'T%'", ["c3", "a1"]),
    ("datasets.context = 'training'", ["a1"]),
    ("datasets.context LIKE 'T%'", []),
    ("datasets.context ILIKE 'T%'", ["a1"]),
    ("datasets.context != 'training'", ["b2"]),            # c3's input has no context tag
])
def test_run_filters(engine, filter_string, expected):
    assert run_ids(engine, filter_string) == expected


def test_run_view_types_and_experiments(engine):
    assert run_ids(engine, view="DELETED_ONLY") == ["e5"]
    assert run_ids(engine, view="ALL") == ["e5", "b2", "c3", "a1", "g7", "d4"]
    assert run_ids(engine, experiments=(1, 2)) == ["f6"] + DEFAULT_ORDER
    assert run_ids(engine, experiments=()) == []
    assert run_ids(engine, "metrics.loss < 0.15", view="ALL") == ["e5"]


@pytest.mark.parametrize("order_by, expected", [
    (["metrics.loss ASC"], ["b2", "a1", "g7", "c3", "d4"]),         # NaN after numbers, missing last
    (["metrics.loss DESC"], ["g7", "a1", "b2", "c3", "d4"]),
    (["metric.`acc`"], ["c3", "a1", "b2", "g7", "d4"]),            # missing: then start_time DESC, run id
    (["params.lr"], ["a1", "b2", "c3", "g7", "d4"]),
    (["params.lr DESC"], ["b2", "a1", "c3", "g7", "d4"]),
    (["tags.team DESC"], ["d4", "b2", "a1", "c3", "g7"]),
    (["attributes.start_time ASC"], ["a1", "g7", "c3", "b2", "d4"]),  # tie on 100 -> run id
    (["start_time DESC"], DEFAULT_ORDER),
    (["created"], ["a1", "g7", "c3", "b2", "d4"]),
    (["run_name"], ["a1", "c3", "g7", "b2", "d4"]),                 # binary order, NULL last
    (["`Run Name` DESC"], ["b2", "g7", "c3", "a1", "d4"]),
    (["run_id DESC"], ["g7", "d4", "c3", "b2", "a1"]),
    (["end_time"], ["a1", "c3", "b2", "g7", "d4"]),
    (["status", "metrics.acc DESC"], ["c3", "a1", "d4", "g7", "b2"]),
    (["user_id DESC", "run_id"], ["g7", "b2", "a1", "c3", "d4"]),
])
def test_run_order_by(engine, order_by, expected):
    assert run_ids(engine, order_by=order_by) == expected


def test_run_order_by_with_filter_and_paging(engine):
    order = ["metrics.loss DESC"]
    assert run_ids(engine, "metrics.loss > 0", order) == ["g7", "a1", "b2"]
    pages = [run_ids(engine, None, order, offset=o, limit=2) for o in (0, 2, 4, 6)]
    assert pages == [["g7", "a1"], ["b2", "c3"], ["d4"], []]
    assert run_ids(engine, offset=1, limit=2) == ["c3", "a1"]
    token = search.encode_page_token(3)
    assert run_ids(engine, offset=search.decode_page_token(token), limit=10) == ["g7", "d4"]


def test_hostile_values_are_data(engine):
    evil = "'; DROP TABLE runs; --"
    assert run_ids(engine, f'params.lr = "{evil}"') == []
    assert run_ids(engine, f"tags.`{evil}` IS NULL") == DEFAULT_ORDER
    assert run_ids(engine, "params.lr LIKE '%'") == ["b2", "a1"]
    assert experiment_ids(engine, f'name = "{evil}"') == []
    assert model_ids(engine, f'tags.env = "{evil}"') == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.runs)).scalar() == len(RUNS)


def test_metric_and_param_filters_use_primary_keys(engine):
    """EXISTS probes by (run_uuid, key): a PK lookup per run, never a scan of the child tables."""
    stmt = search.runs_query([1], "metrics.loss < 1 AND params.lr = '0.1' AND tags.team IS NULL", "ALL",
                             ["metrics.acc DESC"], 0, 10)
    sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))  # our own values
    with engine.connect() as conn:
        plan = " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
    for table in ("latest_metrics", "params", "run_tags"):
        assert f"SCAN {table}" not in plan
    assert "PRIMARY KEY" in plan


def test_many_runs(tmp_path):
    """5,000 runs with metrics, params and tags: results are correct and complete across pages."""
    engine = create_engine(str(tmp_path))
    schema.metadata.create_all(engine)
    n = 5000
    with engine.begin() as conn:
        _insert(conn, schema.experiments, "experiment_id name lifecycle_stage", [(1, "big", "active")])
        _insert(conn, schema.runs, "run_uuid experiment_id status start_time lifecycle_stage",
                [(f"r{i:05d}", 1, "FINISHED", i, "active") for i in range(n)])
        _insert(conn, schema.latest_metrics, "run_uuid key value timestamp step is_nan",
                [(f"r{i:05d}", "loss", i / n, 0, 0, False) for i in range(n)])
        _insert(conn, schema.params, "run_uuid key value",
                [(f"r{i:05d}", "mod", str(i % 7)) for i in range(n)])
    stmt = search.runs_query([1], "metrics.loss >= 0.5 AND params.mod = '3'", "ACTIVE_ONLY",
                             ["metrics.loss ASC"], 0, 10000)
    with engine.connect() as conn:
        got = [r.run_uuid for r in conn.execute(stmt)]
    assert got == [f"r{i:05d}" for i in range(n // 2, n) if i % 7 == 3]
    engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# Experiments


@pytest.mark.parametrize("filter_string, expected", [
    (None, [2, 1, 3]),                                      # creation_time DESC, missing last
    ("name LIKE 'probe%'", [2, 1]),
    ("name LIKE 'probe-t%'", []),
    ("name ILIKE 'PROBE-T%'", [2]),
    ("name = 'other'", [3]),
    ("attribute.name != 'other'", [2, 1]),
    ("experiment_id = '2'", [2]),
    ("attributes.experiment_id = 1", [1]),
    ("experiment_id IN ('1', '3')", [1, 3]),
    ("experiment_id NOT IN (1)", [2, 3]),
    ("experiment_id != '1'", [2, 3]),
    ("creation_time > 100", [2]),
    ("last_update_time <= 150", [1, 3]),
    ("tags.owner = 'ann'", [2]),
    ("tag.owner ILIKE 'ANN'", [2, 1]),
    ("tags.owner LIKE 'A%'", [1]),
    ("tags.owner != 'ann'", [1]),
    ("tags.owner IS NULL", [3]),
    ("tags.`my tag` IS NOT NULL", [2]),
    ("name LIKE 'probe%' AND tags.owner = 'Ann'", [1]),
])
def test_experiment_filters(engine, filter_string, expected):
    assert experiment_ids(engine, filter_string) == expected


def test_experiment_views_workspace_order_and_paging(engine):
    assert experiment_ids(engine, view="DELETED_ONLY") == [4]
    assert experiment_ids(engine, view="ALL") == [4, 2, 1, 3]
    assert experiment_ids(engine, workspace="team") == [5]
    assert experiment_ids(engine, workspace="nobody") == []
    assert experiment_ids(engine, order_by=["name"]) == [3, 2, 1]          # binary: 'T' < 'o'
    assert experiment_ids(engine, order_by=["attributes.creation_time ASC"]) == [1, 2, 3]
    assert experiment_ids(engine, order_by=["last_update_time DESC"]) == [2, 1, 3]
    assert experiment_ids(engine, order_by=["experiment_id DESC"]) == [3, 2, 1]
    assert experiment_ids(engine, order_by=["name DESC", "creation_time"]) == [1, 2, 3]
    assert experiment_ids(engine, offset=1, limit=1) == [1]
    assert experiment_ids(engine, offset=3, limit=1) == []


@pytest.mark.parametrize("filter_string, message", [
    ("experiment_id = 'abc'", "Invalid experiment ID"),
    ("experiment_id IN ('1', 'x')", "Invalid experiment ID"),
    ("experiment_id = 1.5", "Invalid experiment ID"),
    ("experiment_id LIKE '1%'", "Invalid comparator 'LIKE'"),
    ("creation_time = 'x'", "Expected a numeric value for 'creation_time'"),
    ("name IN ('a')", "Invalid comparator 'IN'"),
    ("name IS NULL", "Invalid comparator 'IS NULL'"),
    ("metrics.x > 1", "Invalid entity type 'metrics'"),
    ("params.x = 'a'", "Invalid entity type 'params'"),
    ("tags.a > 'x'", "Invalid comparator '>'"),
    ("run_name = 'a'", "Invalid attribute key 'run_name'"),
    ("name = 'a' OR name = 'b'", "OR is not supported"),
])
def test_bad_experiment_filters(filter_string, message):
    with pytest.raises(RunyardError) as excinfo:
        search.experiments_query(filter_string, "ACTIVE_ONLY", None, 0, 10)
    assert_invalid(excinfo, message)


@pytest.mark.parametrize("order_by, message", [
    (["tags.owner"], "experiments order by attributes only"),
    (["foo"], "Invalid attribute key 'foo'"),
    (["name UP"], "Expected ASC or DESC"),
    (["name", "attributes.name DESC"], "already listed"),
])
def test_bad_experiment_order_by(order_by, message):
    with pytest.raises(RunyardError) as excinfo:
        search.experiments_query(None, "ACTIVE_ONLY", order_by, 0, 10)
    assert_invalid(excinfo, message)


# ---------------------------------------------------------------------------------------------------------
# Logged models


@pytest.mark.parametrize("filter_string, datasets, expected", [
    (None, None, ["m3", "m2", "m1"]),  # creation DESC; m4 (deleted) and m5 (experiment 2) excluded
    ("name LIKE 'model-%'", None, ["m2", "m1"]),
    ("name LIKE 'model-b'", None, []),
    ("name ILIKE 'MODEL-b'", None, ["m2"]),
    ("name IN ('other', 'model-a')", None, ["m3", "m1"]),
    ("attributes.model_id = 'm2'", None, ["m2"]),
    ("model_type = 'agent'", None, ["m1"]),
    ("model_type != 'agent'", None, []),
    ("source_run_id = 'a1'", None, ["m1"]),
    ("status = 'LOGGED_MODEL_READY'", None, ["m1"]),
    ("status != 'LOGGED_MODEL_READY'", None, ["m3", "m2"]),
    ("status IN ('LOGGED_MODEL_PENDING', 'LOGGED_MODEL_UPLOAD_FAILED')", None, ["m3", "m2"]),
    ("status NOT IN ('LOGGED_MODEL_PENDING')", None, ["m3", "m1"]),
    ("status LIKE '%FAIL%'", None, ["m3"]),
    ("status LIKE '%ready'", None, []),
    ("status ILIKE '%ready'", None, ["m1"]),
    ("creation_timestamp > 100", None, ["m3", "m2"]),
    ("creation_time <= 200", None, ["m2", "m1"]),
    ("last_updated_timestamp = 150", None, ["m1"]),
    ("last_updated_time >= 250", None, ["m3", "m2"]),
    ("metrics.acc > 0.8", None, ["m1"]),
    ("metrics.acc > 0.6", None, ["m2", "m1"]),
    ("metrics.acc < 0.6", None, ["m1"]),                    # any point matches (m1 logged 0.5 earlier)
    ("metrics.`acc` = 0.7", None, ["m2"]),
    ("params.lr = '0.1'", None, ["m2"]),
    ("params.lr != '0.1'", None, ["m1"]),
    ("tags.env LIKE 'P%'", None, ["m2"]),
    ("tags.env ILIKE 'p%'", None, ["m2", "m1"]),
    ("tags.env IS NULL", None, ["m3"]),
    ("metrics.acc > 0.6 AND tags.env = 'prod'", None, ["m1"]),
    (None, [{"dataset_name": "eval"}], ["m1"]),
    (None, [{"dataset_name": "eval", "dataset_digest": "zzz"}], []),
    (None, [{"dataset_name": "eval", "dataset_digest": "d1"}, {"dataset_name": "test"}], ["m2", "m1"]),
    ("metrics.acc > 0.6", [{"dataset_name": "test"}], ["m2"]),
    ("metrics.loss > 0", [{"dataset_name": "eval"}], []),    # m1's loss is on 'train'
    ("metrics.loss > 0", [{"dataset_name": "train", "dataset_digest": None}], ["m1"]),
])
def test_logged_model_filters(engine, filter_string, datasets, expected):
    assert model_ids(engine, filter_string, datasets) == expected


@pytest.mark.parametrize("order_by, expected", [
    ([{"field_name": "metrics.acc", "ascending": False}], ["m1", "m2", "m3"]),   # latest point: m1 0.9
    ([{"field_name": "metrics.acc"}], ["m2", "m1", "m3"]),                       # missing last
    ([{"field_name": "metrics.acc", "dataset_name": "test"}], ["m2", "m3", "m1"]),
    ([{"field_name": "metrics.acc", "dataset_name": "eval", "dataset_digest": "d1", "ascending": False}],
     ["m1", "m3", "m2"]),
    ([{"field_name": "name"}], ["m2", "m1", "m3"]),
    ([{"field_name": "creation_time", "ascending": True}], ["m1", "m2", "m3"]),
    ([{"field_name": "creation_timestamp", "ascending": False}], ["m3", "m2", "m1"]),
    ([{"field_name": "last_updated_timestamp"}], ["m1", "m2", "m3"]),
    ([{"field_name": "status"}], ["m2", "m1", "m3"]),
    ([{"field_name": "model_type", "ascending": False}], ["m1", "m3", "m2"]),
    ([{"field_name": "model_id", "ascending": False}], ["m3", "m2", "m1"]),
])
def test_logged_model_order_by(engine, order_by, expected):
    assert model_ids(engine, order_by=order_by) == expected


def test_logged_model_paging_and_experiments(engine):
    assert model_ids(engine, offset=1, limit=1) == ["m2"]
    assert model_ids(engine, experiments=(1, 2), limit=2) == ["m5", "m3"]
    assert model_ids(engine, experiments=()) == []


@pytest.mark.parametrize("filter_string, datasets, order_by, message", [
    ("status = 'BOGUS'", None, None, "Invalid status 'BOGUS'"),
    ("status > 'LOGGED_MODEL_READY'", None, None, "Invalid comparator '>'"),
    ("metrics.acc = 'x'", None, None, "Expected a numeric value for 'metrics.acc'"),
    ("datasets.name = 'x'", None, None, "Invalid entity type 'datasets'"),
    ("creation_timestamp LIKE 'x'", None, None, "Invalid comparator 'LIKE'"),
    ("experiment_id = '1'", None, None, "Invalid attribute key 'experiment_id'"),
    (None, [{"dataset_digest": "x"}], None, "`dataset_name` in the `datasets` clause must be specified"),
    (None, ["eval"], None, "`dataset_name` in the `datasets` clause must be specified"),
    (None, None, [{"field_name": "params.lr"}], "Invalid order by field name: 'params.lr'"),
    (None, None, [{"field_name": "bogus"}], "Invalid order by field name: 'bogus'"),
    (None, None, [{"field_name": "metrics."}], "Invalid order by field name"),
    (None, None, [{"ascending": True}], "`order_by` must be a list of objects with a `field_name`"),
    (None, None, ["name"], "`order_by` must be a list of objects"),
    (None, None, [{"field_name": "name", "ascending": "yes"}], "must be a boolean"),
    (None, None, [{"field_name": "metrics.a", "dataset_digest": "x"}], "`dataset_digest` can only be"),
    (None, None, [{"field_name": "metrics.a", "dataset_name": 3}], "must be strings"),
    (None, [{"dataset_name": "a", "dataset_digest": 3}], None, "`dataset_digest` in the `datasets` clause"),
    (None, {"dataset_name": "a"}, None, "`datasets` must be a list"),
    (None, None, "name", "Invalid order_by"),
    (3, None, None, "expected a string"),
    (None, None, [{"field_name": "name"}, {"field_name": "name"}], "already listed"),
])
def test_bad_logged_model_searches(filter_string, datasets, order_by, message):
    with pytest.raises(RunyardError) as excinfo:
        search.logged_models_query([1], filter_string, datasets, order_by, 0, 10)
    assert_invalid(excinfo, message)


# ---------------------------------------------------------------------------------------------------------
# Compiled SQL on every dialect: filter values are bound parameters, never SQL text.

EVIL = "'; DROP TABLE runs; --"
DIALECTS = {"postgresql": postgresql.dialect(), "mysql": mysql.dialect(), "mssql": mssql.dialect(),
            "sqlite": sqlite.dialect()}


def _queries():
    run_filter = (f'params.p = "{EVIL}" AND tags.`{EVIL}` LIKE "{EVIL}" AND run_name ILIKE "{EVIL}" '
                  f'AND run_id IN ("{EVIL}") AND datasets.context = "{EVIL}" AND metrics.m > 1')
    return {
        "runs": search.runs_query([1], run_filter, "ALL", [f"params.`{EVIL}` DESC", "metrics.m"], 10, 20),
        "experiments": search.experiments_query(f'name LIKE "{EVIL}" AND tags.`{EVIL}` != "{EVIL}"',
                                                "ACTIVE_ONLY", ["name"], 10, 20, workspace=EVIL),
        "logged_models": search.logged_models_query(
            [1], f'name = "{EVIL}" AND params.p LIKE "{EVIL}" AND metrics.`{EVIL}` > 0',
            [{"dataset_name": EVIL, "dataset_digest": EVIL}],
            [{"field_name": f"metrics.{EVIL}", "dataset_name": EVIL}], 10, 20),
    }


def _flatten(values):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
@pytest.mark.parametrize("kind", ["runs", "experiments", "logged_models"])
def test_values_are_bound_parameters(dialect, kind):
    compiled = _queries()[kind].compile(dialect=DIALECTS[dialect])
    sql = str(compiled)
    assert "DROP TABLE" not in sql
    assert EVIL in list(_flatten(compiled.params.values()))
    assert ("COLLATE Latin1_General_CS_AS" in sql) == (dialect == "mssql")  # case-sensitive LIKE/= on MSSQL
    if dialect == "postgresql" and kind == "runs":
        assert "ILIKE" in sql
