"""MLflow's search grammar (filter strings, order_by, page tokens) -> SQLAlchemy Core SELECTs.

One small tokenizer and parser serve runs, experiments and logged models; each entity only declares a
`Grammar` (entity prefixes, attribute keys, comparators) and turns parsed clauses into SQL. Filter values
never reach SQL as text: every literal becomes a bound parameter.

Filter:   <clause> [AND <clause>]*          (AND in any case; no OR, no parentheses grouping)
clause:   <identifier> <comparator> <value> | <identifier> IS [NOT] NULL
ident:    [<prefix>.]<key>; each part bare (letters, digits, _), `backquoted` or "double-quoted"
value:    'single' or "double" quoted string (a doubled quote inside is one quote), a number, or
          ('a', 'b', ...) after IN / NOT IN
order_by: <identifier> [ASC|DESC]
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

from server.errors import invalid
from server.store.schema import (
    datasets,
    experiment_tags,
    experiments,
    input_tags,
    inputs,
    latest_metrics,
    logged_model_metrics,
    logged_model_params,
    logged_model_tags,
    logged_models,
    params,
    run_tags,
    runs,
)

# ---------------------------------------------------------------------------------------------------------
# Page tokens: base64 of JSON {"offset": N}, MLflow's format.


def encode_page_token(offset: int) -> str:
    return base64.b64encode(json.dumps({"offset": int(offset)}).encode()).decode()


def decode_page_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        payload = json.loads(base64.b64decode(token.encode(), validate=True).decode())
        offset = payload["offset"]
    except (binascii.Error, ValueError, UnicodeError, TypeError, KeyError, AttributeError):
        offset = None
    if type(offset) is not int or offset < 0:
        raise invalid(f"Invalid page token {str(token)[:100]!r}: expected the token of a previous response")
    return offset


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class Token:
    kind: str   # WORD NUMBER STRING BQUOTE DOT OP LPAREN RPAREN COMMA END
    text: str   # as written
    value: Any  # unquoted string, parsed number, upper-cased operator
    start: int
    end: int
    quote: str = ""


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![\w.])")
_WORD = re.compile(r"[^\W\d]\w*")
_KEY_PART = re.compile(r"\w+")  # after a dot a key part may start with a digit: metrics.2nd
_OPERATOR = re.compile(r"[=!<>~]+")
_PUNCT = {"(": "LPAREN", ")": "RPAREN", ",": "COMMA"}
_QUOTING_HINT = "quote keys with special characters in backticks, e.g. metrics.`my-metric`"


def _quoted(text: str, i: int, quote: str, what: str) -> tuple[str, int]:
    """The content of the quoted run starting at text[i] (a doubled quote is one quote) and its end."""
    out, j = [], i + 1
    while True:
        k = text.find(quote, j)
        if k < 0:
            raise invalid(f"Unterminated {what} starting at position {i} in {text!r}")
        out.append(text[j:k])
        if text.startswith(quote * 2, k):
            out.append(quote)
            j = k + 2
            continue
        return "".join(out), k + 1


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        prev = tokens[-1] if tokens else None
        glued = prev is not None and prev.end == i
        if c == "." and glued and prev.kind in ("WORD", "BQUOTE", "STRING"):
            tok = Token("DOT", c, c, i, i + 1)
        elif glued and prev.kind == "DOT" and (m := _KEY_PART.match(text, i)):
            tok = Token("WORD", m.group(), m.group(), i, m.end())
        elif m := _NUMBER.match(text, i):
            s = m.group()
            num = float(s) if any(ch in s for ch in ".eE") else int(s)
            tok = Token("NUMBER", s, num, i, m.end())
        elif m := _WORD.match(text, i):
            tok = Token("WORD", m.group(), m.group(), i, m.end())
        elif c in "'\"":
            value, end = _quoted(text, i, c, "string")
            tok = Token("STRING", text[i:end], value, i, end, quote=c)
        elif c == "`":
            value, end = _quoted(text, i, c, "backquoted name")
            tok = Token("BQUOTE", text[i:end], value, i, end, quote=c)
        elif c in _PUNCT:
            tok = Token(_PUNCT[c], c, c, i, i + 1)
        elif m := _OPERATOR.match(text, i):
            tok = Token("OP", m.group(), m.group(), i, m.end())
        else:
            raise invalid(f"Invalid character {c!r} at position {i} in {text!r} ({_QUOTING_HINT})")
        tokens.append(tok)
        i = tok.end
    tokens.append(Token("END", "", None, n, n))
    return tokens


# ---------------------------------------------------------------------------------------------------------
# Parser: grammar-independent; identifiers come out as (prefix or None, key).


@dataclass(frozen=True)
class Identifier:
    prefix: str | None
    key: str
    text: str


@dataclass(frozen=True)
class Clause:
    ident: Identifier
    comparator: str  # one of ALL_COMPARATORS (upper case), or the unknown operator as written
    value: Any       # str (quoted), int/float (bare number), tuple of those (IN lists), None (IS [NOT] NULL)


class _Parser:
    def __init__(self, text: str, what: str):
        self.text, self.what = text, what
        self.tokens = tokenize(text)
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def word(self, *words: str) -> bool:
        return self.tok.kind == "WORD" and self.tok.value.upper() in words

    def fail(self, message: str, tok: Token | None = None) -> Exception:
        tok = tok or self.tok
        found = f"'{tok.text}' at position {tok.start}" if tok.kind != "END" else "the end"
        return invalid(f"{message}, found {found} in {self.what} {self.text!r}")

    def identifier(self) -> Identifier:
        start = self.tok
        if start.kind == "LPAREN":
            raise self.fail("Parentheses grouping is not supported (combine clauses with AND)")
        parts = []
        while True:
            tok = self.tok
            if tok.kind == "WORD" or tok.kind == "BQUOTE" or (tok.kind == "STRING" and tok.quote == '"'):
                parts.append(self.take().value)
            else:
                raise self.fail("Expected an identifier such as metrics.loss or params.`my key`")
            if self.tok.kind != "DOT":
                break
            self.take()
        text = self.text[start.start:self.tokens[self.i - 1].end]
        if len(parts) == 1:
            return Identifier(None, parts[0], text)
        return Identifier(parts[0], ".".join(parts[1:]), text)

    def comparator(self) -> str:
        tok = self.tok
        if tok.kind == "OP":
            return self.take().value  # checked against the entity's comparators by `resolve`
        if self.word("LIKE", "ILIKE", "IN"):
            return self.take().value.upper()
        if self.word("IS"):
            self.take()
            negated = self.word("NOT")
            if negated:
                self.take()
            if not self.word("NULL"):
                raise self.fail("Expected NULL after IS / IS NOT")
            self.take()
            return "IS NOT NULL" if negated else "IS NULL"
        if self.word("NOT"):
            self.take()
            if self.word("IN"):
                self.take()
                return "NOT IN"
            tok = self.tok
        if tok.kind == "END":
            raise self.fail("Expected a comparator")
        raise self.fail(f"Invalid comparator '{tok.text}' not one of {list(ALL_COMPARATORS)}")

    def scalar(self) -> Any:
        tok = self.tok
        if tok.kind in ("STRING", "NUMBER"):
            return self.take().value
        if tok.kind == "LPAREN":
            raise self.fail("A parenthesised list is only allowed after IN / NOT IN")
        raise self.fail("Expected a quoted string or a number")

    def value(self, comparator: str) -> Any:
        if comparator in ("IS NULL", "IS NOT NULL"):
            return None
        if comparator not in ("IN", "NOT IN"):
            return self.scalar()
        if self.tok.kind != "LPAREN":
            raise self.fail(f"Expected a list such as ('a', 'b') after {comparator}")
        self.take()
        if self.tok.kind == "RPAREN":
            raise self.fail(f"The list after {comparator} must not be empty")
        items = [self.scalar()]
        while self.tok.kind == "COMMA":
            self.take()
            if self.tok.kind == "RPAREN":  # trailing comma
                break
            items.append(self.scalar())
        if self.tok.kind != "RPAREN":
            raise self.fail("Expected ',' or ')' in the list")
        self.take()
        return tuple(items)

    def filter(self) -> list[Clause]:
        clauses = []
        while True:
            ident = self.identifier()
            comparator = self.comparator()
            clauses.append(Clause(ident, comparator, self.value(comparator)))
            if self.tok.kind == "END":
                return clauses
            if self.word("OR"):
                raise self.fail("OR is not supported, only AND")
            if not self.word("AND"):
                raise self.fail("Expected AND between clauses")
            self.take()

    def order_by(self) -> tuple[Identifier, bool]:
        ident = self.identifier()
        ascending = True
        if self.word("ASC", "DESC"):
            ascending = self.take().value.upper() == "ASC"
        if self.tok.kind != "END":
            raise self.fail("Expected ASC or DESC after the key")
        return ident, ascending


def parse_filter(filter_string: str | None) -> list[Clause]:
    if filter_string is not None and not isinstance(filter_string, str):
        raise invalid(f"Invalid filter {filter_string!r}: expected a string")
    if filter_string is None or not filter_string.strip():
        return []
    return _Parser(filter_string, "filter").filter()


def parse_order_by(order_by: str) -> tuple[Identifier, bool]:
    if not isinstance(order_by, str) or not order_by.strip():
        raise invalid(f"Invalid order_by clause {order_by!r}: expected '<key> [ASC|DESC]'")
    return _Parser(order_by, "order_by clause").order_by()


# ---------------------------------------------------------------------------------------------------------
# Grammars: what each entity accepts, and the resolution of parsed clauses against them.

NUMERIC = ("=", "!=", "<", "<=", ">", ">=")
STRING = ("=", "!=", "LIKE", "ILIKE")
STRING_LIST = STRING + ("IN", "NOT IN")
KEYED = STRING + ("IS NULL", "IS NOT NULL")
ID_LIST = ("=", "!=", "IN", "NOT IN")
ALL_COMPARATORS = NUMERIC + ("LIKE", "ILIKE", "IN", "NOT IN", "IS NULL", "IS NOT NULL")


@dataclass(frozen=True)
class Attr:
    column: str
    kind: str  # "string" | "number" | "id" (integer id, quoted or not) | "status" (logged model enum)
    comparators: tuple[str, ...]


@dataclass(frozen=True)
class Grammar:
    prefixes: dict[str, str]  # written prefix -> entity ("attribute", "metric", "param", "tag", "dataset")
    attributes: dict[str, Attr]  # attribute key or alias -> column
    keyed: dict[str, tuple[str, ...]]  # keyed entity ("metric", "param", "tag") -> comparators


@dataclass(frozen=True)
class Resolved:
    entity: str
    key: str
    comparator: str
    value: Any
    attr: Attr | None
    text: str


_ATTRIBUTE_PREFIXES = {"attribute": "attribute", "attributes": "attribute", "attr": "attribute"}
_RUN_ATTRS = {
    **dict.fromkeys(["run_id"], Attr("run_uuid", "string", STRING_LIST)),
    **dict.fromkeys(["run_name", "run name", "Run name", "Run Name"], Attr("name", "string", STRING)),
    **{k: Attr(k, "string", STRING) for k in ("status", "user_id", "artifact_uri")},
    **dict.fromkeys(["start_time", "created", "Created"], Attr("start_time", "number", NUMERIC)),
    "end_time": Attr("end_time", "number", NUMERIC),
}
_DATASET_ATTRS = {k: Attr(k, "string", STRING_LIST) for k in ("name", "digest", "context")}
RUNS = Grammar(
    {**_ATTRIBUTE_PREFIXES, "run": "attribute", "metric": "metric", "metrics": "metric",
     **dict.fromkeys(["param", "params", "parameter", "parameters"], "param"), "tag": "tag", "tags": "tag",
     "dataset": "dataset", "datasets": "dataset"},
    _RUN_ATTRS,
    {"metric": NUMERIC, "param": KEYED, "tag": KEYED},
)
EXPERIMENTS = Grammar(
    {**_ATTRIBUTE_PREFIXES, "tag": "tag", "tags": "tag"},
    {"name": Attr("name", "string", STRING), "experiment_id": Attr("experiment_id", "id", ID_LIST),
     "creation_time": Attr("creation_time", "number", NUMERIC),
     "last_update_time": Attr("last_update_time", "number", NUMERIC)},
    {"tag": KEYED},
)
LOGGED_MODEL_STATUSES = {"LOGGED_MODEL_STATUS_UNSPECIFIED": 0, "LOGGED_MODEL_PENDING": 1,
                         "LOGGED_MODEL_READY": 2, "LOGGED_MODEL_UPLOAD_FAILED": 3}
LOGGED_MODELS = Grammar(
    {**_ATTRIBUTE_PREFIXES, "metric": "metric", "metrics": "metric", "param": "param", "params": "param",
     "tag": "tag", "tags": "tag"},
    {**{k: Attr(k, "string", STRING_LIST) for k in ("name", "model_id", "model_type", "source_run_id")},
     "status": Attr("status", "status", STRING_LIST),
     **dict.fromkeys(["creation_timestamp", "creation_time"],
                     Attr("creation_timestamp_ms", "number", NUMERIC)),
     **dict.fromkeys(["last_updated_timestamp", "last_updated_time"],
                     Attr("last_updated_timestamp_ms", "number", NUMERIC))},
    {"metric": NUMERIC, "param": KEYED, "tag": KEYED},
)


def _entity(grammar: Grammar, ident: Identifier) -> tuple[str, Attr | None]:
    if ident.prefix is None:
        entity = "attribute"
    elif ident.prefix in grammar.prefixes:
        entity = grammar.prefixes[ident.prefix]
    else:
        valid = sorted(set(grammar.prefixes))
        raise invalid(f"Invalid entity type '{ident.prefix}' in '{ident.text}'. Valid values are {valid}")
    if entity == "attribute":
        if ident.key not in grammar.attributes:
            raise invalid(f"Invalid attribute key '{ident.key}' specified. Valid keys are "
                          f"{sorted(grammar.attributes)}")
        return entity, grammar.attributes[ident.key]
    if entity == "dataset":
        if ident.key not in _DATASET_ATTRS:
            raise invalid(f"Invalid dataset key '{ident.key}' specified. "
                          f"Valid keys are {sorted(_DATASET_ATTRS)}")
        return entity, _DATASET_ATTRS[ident.key]
    if not ident.key:
        raise invalid(f"Missing key after '{ident.prefix}.' in '{ident.text}'")
    return entity, None


def _check_value(clause: Clause, entity: str, attr: Attr | None) -> Any:
    """The clause's value, checked against (and converted for) the column it is compared with."""
    if clause.value is None:  # IS [NOT] NULL
        return None
    kind = attr.kind if attr else ("number" if entity == "metric" else "string")
    items = clause.value if isinstance(clause.value, tuple) else (clause.value,)
    for item in items:
        if kind == "number" and isinstance(item, str):
            raise invalid(f"Expected a numeric value for '{clause.ident.text}', found {item!r}")
        if kind in ("string", "status") and not isinstance(item, str):
            raise invalid(f"Expected a quoted string value for '{clause.ident.text}' (e.g. 'my-value'), "
                          f"found {item!r}")
    if kind == "number":
        value = clause.value
        if isinstance(value, int) and not -2**63 <= value < 2**63:
            value = float(value)
        return min(max(value, -sys.float_info.max), sys.float_info.max)  # +/-inf as they are stored
    if kind == "id":
        try:
            ids = tuple(int(str(v).strip()) for v in items)
            if not all(-2**63 <= i < 2**63 for i in ids):
                raise ValueError
        except ValueError:
            raise invalid(f"Invalid experiment ID in '{clause.ident.text}': {clause.value!r}") from None
        return ids if isinstance(clause.value, tuple) else ids[0]
    return clause.value


def resolve(grammar: Grammar, clause: Clause) -> Resolved:
    entity, attr = _entity(grammar, clause.ident)
    allowed = attr.comparators if attr else grammar.keyed[entity]
    comparator = clause.comparator.upper()
    if comparator not in allowed:
        raise invalid(f"Invalid comparator '{clause.comparator}' not one of {list(allowed)} "
                      f"for '{clause.ident.text}'")
    return Resolved(entity, clause.ident.key, comparator, _check_value(clause, entity, attr), attr,
                    clause.ident.text)


def resolve_order_by(grammar: Grammar, text: str) -> tuple[str, str, Attr | None, bool]:
    ident, ascending = parse_order_by(text)
    entity, attr = _entity(grammar, ident)
    if entity not in ("attribute", "metric", "param", "tag"):
        raise invalid(f"Invalid order_by clause {text!r}: cannot order by {entity}")
    return entity, ident.key, attr, ascending


# ---------------------------------------------------------------------------------------------------------
# SQL building blocks

MSSQL_CASE_SENSITIVE = "Latin1_General_CS_AS"


class CaseSensitive(sa.sql.ColumnElement):
    """A string column compared case-sensitively: as is everywhere (SQLite runs case_sensitive_like, MySQL
    columns are utf8mb4_bin, PostgreSQL is case-sensitive), with a case-sensitive collation on MSSQL."""

    inherit_cache = True
    _traverse_internals: ClassVar = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column):
        self.column = column
        self.type = column.type


@compiles(CaseSensitive)
def _compile_case_sensitive(element, compiler, **kw):
    return compiler.process(element.column, **kw)


@compiles(CaseSensitive, "mssql")
def _compile_case_sensitive_mssql(element, compiler, **kw):
    return compiler.process(element.column.collate(MSSQL_CASE_SENSITIVE), **kw)


_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": lambda c, v: c == v, "!=": lambda c, v: c != v, "<": lambda c, v: c < v, "<=": lambda c, v: c <= v,
    ">": lambda c, v: c > v, ">=": lambda c, v: c >= v, "LIKE": lambda c, v: c.like(v),
    "IN": lambda c, v: c.in_(list(v)), "NOT IN": lambda c, v: c.not_in(list(v)),
}


def compare(column, comparator: str, value: Any, string: bool = True):
    if comparator == "ILIKE":
        return column.ilike(value)
    return _OPS[comparator](CaseSensitive(column) if string else column, value)


def _like_regex(pattern: str, ignore_case: bool) -> re.Pattern:
    body = "".join(".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.compile(body, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _status_condition(column, r: Resolved):
    """Logged model status: the filter names the enum, the column stores its number."""
    if r.comparator in ("LIKE", "ILIKE"):
        regex = _like_regex(r.value, r.comparator == "ILIKE")
        return column.in_([n for name, n in LOGGED_MODEL_STATUSES.items() if regex.fullmatch(name)])
    names = r.value if isinstance(r.value, tuple) else (r.value,)
    unknown = [name for name in names if name not in LOGGED_MODEL_STATUSES]
    if unknown:
        raise invalid(f"Invalid status {unknown[0]!r} in '{r.text}'. Valid values are "
                      f"{list(LOGGED_MODEL_STATUSES)}")
    numbers = [LOGGED_MODEL_STATUSES[name] for name in names]
    op = {"=": "IN", "!=": "NOT IN"}.get(r.comparator, r.comparator)
    return compare(column, op, numbers, string=False)


def attribute_condition(table: sa.Table, r: Resolved):
    column = table.c[r.attr.column]
    if r.attr.kind == "status":
        return _status_condition(column, r)
    return compare(column, r.comparator, r.value, string=r.attr.kind == "string")


def keyed_exists(table: sa.Table, owner: str, key_col: str, value_col: str, r: Resolved, parent: sa.Table):
    """EXISTS a row of `table` for the parent row with this key (and a value that matches)."""
    conditions = [table.c[owner] == parent.c[owner], table.c[key_col] == r.key]
    if r.comparator == "IS NULL":
        return ~sa.exists().where(*conditions).correlate(parent)
    if r.comparator != "IS NOT NULL":
        conditions.append(compare(table.c[value_col], r.comparator, r.value))
    return sa.exists().where(*conditions).correlate(parent)


def missing_last(column, ascending: bool, nan=None) -> list:
    """ORDER BY terms putting NULLs (and then NaN, when given) after real values in both directions."""
    rank = sa.literal_column  # our constants, inlined: no parameters to type in ORDER BY
    whens = [(column.is_(None), rank("2"))] + ([(nan == sa.true(), rank("1"))] if nan is not None else [])
    return [sa.case(*whens, else_=rank("0")), column.asc() if ascending else column.desc()]


def _view_condition(column, view_type: str | None):
    stages = {None: ["active"], "ACTIVE_ONLY": ["active"], "DELETED_ONLY": ["deleted"],
              "ALL": ["active", "deleted"]}
    if view_type not in stages:
        raise invalid(f"Invalid view type {view_type!r}. Valid values are {[k for k in stages if k]}")
    stage = stages[view_type]
    return column == stage[0] if len(stage) == 1 else column.in_(stage)


def _page(stmt, offset: int, limit: int | None):
    if offset < 0 or (limit is not None and limit < 0):
        raise invalid(f"Invalid paging: offset {offset} and limit {limit} must not be negative")
    return stmt.offset(offset).limit(limit)


def _order_list(order_by) -> list:
    if order_by is None:
        return []
    if not isinstance(order_by, (list, tuple)):
        raise invalid(f"Invalid order_by {order_by!r}: expected a list")
    return list(order_by)


def _no_duplicates(seen: set, item, text: str) -> None:
    if item in seen:
        raise invalid(f"Invalid order_by: {text!r} orders by a field already listed")
    seen.add(item)


# ---------------------------------------------------------------------------------------------------------
# Runs


def _run_condition(r: Resolved):
    if r.entity == "attribute":
        return attribute_condition(runs, r)
    if r.entity == "metric":
        m = latest_metrics
        value = compare(m.c.value, r.comparator, float(r.value), string=False)
        # NaN is stored as 0 with is_nan set: it fails every comparison except != (IEEE, as MLflow).
        value = sa.or_(value, m.c.is_nan == sa.true()) if r.comparator == "!=" else sa.and_(
            value, m.c.is_nan == sa.false())
        return sa.exists().where(m.c.run_uuid == runs.c.run_uuid, m.c.key == r.key, value).correlate(runs)
    if r.entity in ("param", "tag"):
        return keyed_exists(params if r.entity == "param" else run_tags, "run_uuid", "key", "value", r, runs)
    # datasets: the run has a dataset input whose dataset (or whose context tag) matches
    link = [inputs.c.source_type == "DATASET", inputs.c.destination_type == "RUN",
            inputs.c.destination_id == runs.c.run_uuid]
    if r.key == "context":
        link += [input_tags.c.input_uuid == inputs.c.input_uuid, input_tags.c.name == "mlflow.data.context",
                 compare(input_tags.c.value, r.comparator, r.value)]
    else:
        link += [datasets.c.dataset_uuid == inputs.c.source_id,
                 compare(datasets.c[r.key], r.comparator, r.value)]
    return sa.exists().where(*link).correlate(runs)


def runs_query(experiment_ids: list[int], filter_string: str | None, view_type: str,
               order_by: list[str] | None, offset: int, limit: int) -> sa.Select:
    conditions = [runs.c.experiment_id.in_(list(experiment_ids)),
                  _view_condition(runs.c.lifecycle_stage, view_type)]
    conditions += [_run_condition(resolve(RUNS, clause)) for clause in parse_filter(filter_string)]
    source, terms, seen = runs, [], set()
    for i, text in enumerate(_order_list(order_by)):
        entity, key, attr, ascending = resolve_order_by(RUNS, text)
        if attr is not None:
            _no_duplicates(seen, attr.column, text)
            terms += missing_last(runs.c[attr.column], ascending)
            continue
        _no_duplicates(seen, (entity, key), text)
        table = {"metric": latest_metrics, "param": params, "tag": run_tags}[entity].alias(f"order_{i}")
        source = source.outerjoin(table, sa.and_(table.c.run_uuid == runs.c.run_uuid, table.c.key == key))
        terms += missing_last(table.c.value, ascending, table.c.is_nan if entity == "metric" else None)
    if "start_time" not in seen:
        terms += missing_last(runs.c.start_time, ascending=False)
    if "run_uuid" not in seen:  # MSSQL rejects a column listed twice in ORDER BY
        terms.append(runs.c.run_uuid.asc())
    stmt = sa.select(runs).select_from(source).where(*conditions).order_by(*terms)
    return _page(stmt, offset, limit)


# ---------------------------------------------------------------------------------------------------------
# Experiments


def _experiment_condition(r: Resolved):
    if r.entity == "attribute":
        return attribute_condition(experiments, r)
    return keyed_exists(experiment_tags, "experiment_id", "key", "value", r, experiments)


def experiments_query(filter_string: str | None, view_type: str, order_by: list[str] | None,
                      offset: int, limit: int, workspace: str = "default") -> sa.Select:
    conditions = [experiments.c.workspace == workspace,
                  _view_condition(experiments.c.lifecycle_stage, view_type)]
    conditions += [_experiment_condition(resolve(EXPERIMENTS, c)) for c in parse_filter(filter_string)]
    terms, seen = [], set()
    for text in _order_list(order_by) or ["creation_time DESC"]:
        _entity_name, _key, attr, ascending = resolve_order_by(EXPERIMENTS, text)
        if attr is None:
            raise invalid(f"Invalid order_by clause {text!r}: experiments order by attributes only "
                          f"{sorted(EXPERIMENTS.attributes)}")
        _no_duplicates(seen, attr.column, text)
        terms += missing_last(experiments.c[attr.column], ascending)
    if "experiment_id" not in seen:
        terms.append(experiments.c.experiment_id.asc())
    stmt = sa.select(experiments).where(*conditions).order_by(*terms)
    return _page(stmt, offset, limit)


# ---------------------------------------------------------------------------------------------------------
# Logged models. A metric filter matches when ANY point of that metric (any step, run or dataset; only the
# requested datasets when `datasets` is given) satisfies it, as MLflow's SQL store does; ordering by a metric
# uses its latest point (greatest timestamp, then step; run id breaks ties), again as MLflow does.


def _dataset_condition(dataset_filters: list[dict] | None):
    if not dataset_filters:
        return None
    if not isinstance(dataset_filters, (list, tuple)):
        raise invalid("`datasets` must be a list of objects with a `dataset_name`")
    m, options = logged_model_metrics, []
    for d in dataset_filters:
        name = d.get("dataset_name") if isinstance(d, dict) else None
        if not isinstance(name, str) or not name:
            raise invalid("`dataset_name` in the `datasets` clause must be specified.")
        digest = d.get("dataset_digest")
        if digest is not None and not isinstance(digest, str):
            raise invalid("`dataset_digest` in the `datasets` clause must be a string")
        options.append(sa.and_(m.c.dataset_name == name, *([m.c.dataset_digest == digest] if digest else [])))
    return sa.or_(*options)


def _model_condition(r: Resolved, in_datasets):
    lm = logged_models
    if r.entity == "attribute":
        return attribute_condition(lm, r)
    if r.entity == "metric":
        m = logged_model_metrics
        where = [m.c.model_id == lm.c.model_id, m.c.metric_name == r.key,
                 compare(m.c.metric_value, r.comparator, float(r.value), string=False)]
        return sa.exists().where(*where, *([in_datasets] if in_datasets is not None else [])).correlate(lm)
    table, key, value = ((logged_model_params, "param_key", "param_value") if r.entity == "param"
                         else (logged_model_tags, "tag_key", "tag_value"))
    return keyed_exists(table, "model_id", key, value, r, lm)


def _model_metric_order(key: str, dataset_name: str | None, digest: str | None):
    """The latest value of the model's metric `key` (optionally on one dataset), a correlated scalar."""
    m = logged_model_metrics
    where = [m.c.model_id == logged_models.c.model_id, m.c.metric_name == key]
    if dataset_name:
        where.append(m.c.dataset_name == dataset_name)
    if digest:
        where.append(m.c.dataset_digest == digest)
    latest = (sa.select(m.c.metric_value).where(*where).correlate(logged_models)
              .order_by(m.c.metric_timestamp_ms.desc(), m.c.metric_step.desc(), m.c.run_id.asc()).limit(1))
    return latest.scalar_subquery()


def _model_order_terms(item: dict, seen: set) -> list:
    """ORDER BY terms for one {"field_name", "ascending", "dataset_name", "dataset_digest"} item."""
    if not isinstance(item, dict) or not isinstance(item.get("field_name"), str):
        raise invalid("`order_by` must be a list of objects with a `field_name`")
    name, ascending = item["field_name"].strip(), item.get("ascending")
    ascending = True if ascending is None else ascending
    if not isinstance(ascending, bool):
        raise invalid(f"Value of `ascending` in the `order_by` clause must be a boolean, got {ascending!r}")
    dataset_name, digest = item.get("dataset_name"), item.get("dataset_digest")
    if not all(v is None or isinstance(v, str) for v in (dataset_name, digest)):
        raise invalid("`dataset_name` and `dataset_digest` in the `order_by` clause must be strings")
    if digest and not dataset_name:
        raise invalid("`dataset_digest` can only be specified if `dataset_name` is also specified.")
    prefix, dot, key = name.partition(".")
    key = key.strip("`")
    if dot and LOGGED_MODELS.prefixes.get(prefix) == "metric" and key:
        _no_duplicates(seen, ("metric", key, dataset_name, digest), name)
        return missing_last(_model_metric_order(key, dataset_name, digest), ascending)
    if not dot and name in LOGGED_MODELS.attributes:
        column = LOGGED_MODELS.attributes[name].column
        _no_duplicates(seen, column, name)
        return missing_last(logged_models.c[column], ascending)
    raise invalid(f"Invalid order by field name: {name!r}. Use metrics.<name> or one of "
                  f"{sorted(LOGGED_MODELS.attributes)}")


def logged_models_query(experiment_ids: list[int], filter_string: str | None, datasets: list[dict] | None,
                        order_by: list[dict] | None, offset: int, limit: int) -> sa.Select:
    lm = logged_models
    in_datasets = _dataset_condition(datasets)
    resolved = [resolve(LOGGED_MODELS, c) for c in parse_filter(filter_string)]
    conditions = [lm.c.experiment_id.in_(list(experiment_ids)), lm.c.lifecycle_stage == "active"]
    conditions += [_model_condition(r, in_datasets) for r in resolved]
    if in_datasets is not None and not any(r.entity == "metric" for r in resolved):
        m = logged_model_metrics
        conditions.append(sa.exists().where(m.c.model_id == lm.c.model_id, in_datasets).correlate(lm))
    terms, seen = [], set()
    for item in _order_list(order_by):
        terms += _model_order_terms(item, seen)
    if "creation_timestamp_ms" not in seen:
        terms.append(lm.c.creation_timestamp_ms.desc())
    if "model_id" not in seen:
        terms.append(lm.c.model_id.asc())
    stmt = sa.select(lm).where(*conditions).order_by(*terms)
    return _page(stmt, offset, limit)
