"""Kubernetes deployment settings from runyard.yaml and command-line flags.

runyard.yaml holds one section per target; `kubernetes:` maps KubernetesSettings' field names (snake_case)
to values, with nested mappings for server_resources / nginx_resources / autoscaling / kerberos / ingress
and SECRET/KEY strings for Secret references:

    kubernetes:
      name: runyard
      namespace: ml
      image: ghcr.io/acme/runyard:1.4.2
      artifacts_destination: s3://ml-artifacts/runyard
      backend_store_uri_secret: runyard-db/uri
      htpasswd_secret: runyard-auth/htpasswd
      ingress: {host: mlflow.example.com, class_name: nginx}
    aws: {...}   # read by the aws target

Flags that are not None override the file; a nested section given both ways is merged key by key, and a
flag may also name one nested key with a dot (`ingress.host`). Unknown keys and wrong types are errors
naming the key and where it came from: a typo must not quietly deploy a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from infra.k8s.settings import (
    Autoscaling,
    Ingress,
    Kerberos,
    KubernetesSettings,
    Resources,
    SecretRef,
    SettingsError,
)
from server.errors import RunyardError

SECTIONS = ("kubernetes", "aws")  # top-level keys of runyard.yaml; each target reads its own
_NESTED = (Resources, Autoscaling, Kerberos, Ingress)
# Quantities may be written as YAML numbers (cpu_request: 1); Kubernetes takes "1" just the same.
_QUANTITIES = {"cpu_request", "memory_request", "cpu_limit", "memory_limit", "data_volume_size",
               "backup_volume_size"}


def load_kubernetes_settings(flags: dict[str, object], config_file: str | None) -> KubernetesSettings:
    values: dict[str, object] = {}
    sources: dict[str, str] = {}  # key path ("image", "ingress.host") -> the file or flag that set it
    if config_file:
        for key, value in _read_section(config_file).items():
            values[key], sources[key] = value, config_file
    for flag, value in flags.items():
        if value is None:
            continue
        key, dot, inner = flag.partition(".")
        if dot:  # one nested key: ingress.host
            value = {inner: value}
        if isinstance(value, dict):
            sources.update({f"{key}.{name}": _flag(flag) for name in value})
            if isinstance(values.get(key), dict):  # merged into the file's section, key by key
                value = {**values[key], **value}
            else:
                sources[key] = _flag(flag)
        else:
            sources[key] = _flag(flag)
        values[key] = value
    try:
        return _Reader(sources).build(KubernetesSettings, values, "")
    except SettingsError as exc:
        raise RunyardError(str(exc), "INVALID_PARAMETER_VALUE") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace(".", "-")


def load_aws_settings(flags: dict[str, object], config_file: str | None):
    """AwsSettings from runyard.yaml's `aws:` section, flags that are not None winning."""
    from infra.aws.settings import AwsSettings
    from infra.aws.settings import SettingsError as AwsSettingsError

    values = _read_section(config_file, "aws") if config_file else {}
    values.update({key: value for key, value in flags.items() if value is not None})
    try:
        return AwsSettings.from_mapping(values)
    except (AwsSettingsError, TypeError) as exc:
        raise RunyardError(str(exc), "INVALID_PARAMETER_VALUE") from None


def _read_section(config_file: str, name: str = "kubernetes") -> dict:
    try:
        document = yaml.safe_load(Path(config_file).read_text())
    except OSError as exc:
        raise _invalid(f"Cannot read {config_file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise _invalid(f"{config_file} is not valid YAML{where}: {problem}") from None
    document = {} if document is None else document
    if not isinstance(document, dict):
        raise _invalid(f"{config_file}: expected a mapping with the sections {', '.join(SECTIONS)}")
    unknown = [str(key) for key in document if key not in SECTIONS]
    if unknown:
        raise _invalid(f"{config_file}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    section = document.get(name) or {}
    if not isinstance(section, dict):
        raise _invalid(f"{config_file}: {name} must be a mapping of settings")
    return dict(section)


class _Reader:
    """Builds the settings dataclasses from plain values, checking each against its field's type."""

    def __init__(self, sources: dict[str, str]):
        self.sources = sources

    def where(self, key: str) -> str:
        """kubernetes.ingress.host in runyard.yaml, or --ingress-host."""
        source = self.sources.get(key) or self.sources.get(key.split(".")[0], "")
        if source.startswith("--"):
            return source if source == _flag(key) else f"{key} ({source})"
        return f"kubernetes.{key} in {source}" if source else key

    def fields(self, cls, values: dict, prefix: str) -> dict:
        hints = typing.get_type_hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        arguments = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = (f"did you mean {prefix}{close[0]}?" if close else
                        f"known settings{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(known)}")
                raise _invalid(f"Unknown setting {self.where(prefix + str(key))}; {hint}")
            if value is not None:  # null: not set, the default applies
                arguments[key] = self.convert(hints[key], value, prefix + key)
        return arguments

    def build(self, cls, values: dict, prefix: str):
        arguments = self.fields(cls, values, prefix)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in arguments
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            names = ", ".join(prefix + name for name in missing)
            hint = " (give them as flags, or under kubernetes: in runyard.yaml)" if not prefix else ""
            raise _invalid(f"Missing setting{'s' if len(missing) > 1 else ''}: {names}{hint}")
        return cls(**arguments)

    def convert(self, hint, value, key: str):
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
        if hint in _NESTED:
            if isinstance(value, hint):
                return value
            if not isinstance(value, dict):
                raise self.wrong(key, "a mapping of settings", value)
            if hint is Resources:  # a partial section keeps the defaults of the keys it leaves out
                default = next(f.default for f in dataclasses.fields(KubernetesSettings) if f.name == key)
                return dataclasses.replace(default, **self.fields(Resources, value, f"{key}."))
            return self.build(hint, value, f"{key}.")
        if hint is SecretRef:
            if isinstance(value, SecretRef):
                return value
            if not isinstance(value, str):
                raise self.wrong(key, "SECRET/KEY text", value)
            return SecretRef.parse(value, key)
        if hint is bool or hint is int:
            if isinstance(value, bool) != (hint is bool) or not isinstance(value, int):
                raise self.wrong(key, "true or false" if hint is bool else "a whole number", value)
            return value
        if hint is str:
            if key.rsplit(".", 1)[-1] in _QUANTITIES and type(value) in (int, float):
                return str(value)
            if not isinstance(value, str):
                raise self.wrong(key, "text", value)
            return value
        if origin is tuple:
            if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
                raise self.wrong(key, "a list of names", value)
            return tuple(value)
        if origin is dict:
            if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in value.items()):
                raise self.wrong(key, "a mapping of text to text (quote numbers and booleans)", value)
            return dict(value)
        raise _invalid(f"{key}: a setting of type {hint} cannot be read from runyard.yaml yet")

    def wrong(self, key: str, expected: str, value) -> RunyardError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return _invalid(f"Setting {self.where(key)}: expected {expected}, got {type(value).__name__} {shown}")


def _invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")
