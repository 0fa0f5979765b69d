"""Input rules of MLflow's tracking service (names, keys, limits), checked before anything is written."""

from __future__ import annotations

import functools
import math
import posixpath
import re

from server.errors import RunyardError, invalid

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_EXPERIMENT_TAG_VALUE_LENGTH = 20000
MAX_EXPERIMENT_NAME_LENGTH = 500
MAX_ARTIFACT_LOCATION_LENGTH = 2048
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
MAX_BATCH_TAGS = 100
MAX_BATCH_ENTITIES = 1000
MAX_DATASET_NAME = 500
MAX_DATASET_DIGEST = 36
MAX_DATASET_SOURCE = 65535
MAX_DATASET_SCHEMA = 1048575
MAX_DATASET_PROFILE = 16777215
MAX_INPUT_TAG_KEY = 255
MAX_INPUT_TAG_VALUE = 500
MAX_RESULTS_RUNS = 50000
MAX_RESULTS_EXPERIMENTS = 50000
DOUBLE_MAX = 1.7976931348623157e308

_KEY = re.compile(r"^[/\w.\- :]*$")
_RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")


def key(value: str, what: str = "key") -> str:
    if type(value) is str and _known_good_key(value):
        return value
    return _check_key(value, what)


@functools.lru_cache(maxsize=8192)
def _known_good_key(value: str) -> bool:
    """Batches repeat the same few keys; remember the ones that passed."""
    try:
        _check_key(value, "key")
    except RunyardError:
        return False
    return True


def _check_key(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"Missing value for required parameter '{what}'.")
    if len(value) > MAX_KEY_LENGTH:
        raise invalid(f"'{what}' exceeds the maximum length of {MAX_KEY_LENGTH} characters: "
                      f"'{value[:40]}...'")
    if not _KEY.match(value):
        raise invalid(f"Invalid value '{value}' for parameter '{what}' supplied: Names may only contain "
                      "alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), colon(:) "
                      "and slashes (/).")
    normalized = posixpath.normpath(value)
    if normalized != value or normalized == "." or normalized.startswith(("..", "/")):
        raise invalid(f"Invalid value '{value}' for parameter '{what}' supplied: Names may not contain "
                      "empty, '.' or '..' path segments, nor start or end with a slash.")
    return value


def run_id(value: str) -> str:
    if not _RUN_ID.match(value or ""):
        raise invalid(f"Invalid value '{value}' for parameter 'run_id' supplied.")
    return value


def experiment_id(value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(f"Invalid value '{value}' for parameter 'experiment_id' supplied: "
                      "experiment IDs are integers.") from None
    if number < 0 or number > 2**31 - 1:
        raise invalid(f"Invalid value '{value}' for parameter 'experiment_id' supplied.")
    return number


def experiment_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise invalid("Invalid experiment name: '{}'. The name must be a non-empty string.".format(
            name if name is not None else ""))
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise invalid(f"Experiment name exceeds the maximum length of {MAX_EXPERIMENT_NAME_LENGTH} "
                      "characters.")
    return name


def truncate(value: str, limit: int) -> str:
    """MLflow's server truncates over-long param and tag values rather than rejecting them."""
    return value if len(value) <= limit else value[:limit]


def metric_point(name: str, value: float, timestamp, step) -> tuple[float, bool]:
    """(stored value, is_nan): NaN is stored as 0 + flag, +/-Infinity as +/-max double."""
    if timestamp is None or timestamp < 0:
        raise invalid(f"Got invalid timestamp {timestamp} for metric '{name}' (value={value}). "
                      "Timestamp must be a nonnegative long (64-bit integer).")
    if step is None:
        raise invalid(f"Got invalid step for metric '{name}'. Step must be a valid long (64-bit integer).")
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (DOUBLE_MAX if value > 0 else -DOUBLE_MAX), False
    return value, False


def max_results(value: int | None, default: int, limit: int) -> int:
    if value is None:
        return default
    if value <= 0:
        raise invalid(f"Invalid value {value} for parameter 'max_results' supplied. "
                      "It must be a positive integer.")
    if value > limit:
        raise invalid(f"Invalid value {value} for parameter 'max_results' supplied. "
                      f"It must be at most {limit}.")
    return value
