"""Where secrets live: one small interface in front of a file, AWS Secrets Manager, and what comes later.

`open_secret(ref)` turns a reference into a `Secret` that reads and writes one string value:

  /path/to/file, file:///path/to/file   a file, replaced atomically on write (a temporary file in the same
                                        folder, created 0600, fsynced, renamed over the old one; the folder
                                        is fsynced too). A new file is 0600; an existing one keeps its owner
                                        and group, and becomes 0640 when it had any group bit, else 0600.
                                        A symbolic link is followed: the file it points to is replaced.
                                        Reading strips a trailing newline (`echo pw > file` works).
  aws-sm://<secret-id>[?region=…]       an AWS Secrets Manager secret (a name or a full ARN) through boto3:
                                        its current SecretString; writing puts a new version, creating the
                                        secret when it does not exist. Credentials, region and endpoint come
                                        from the usual AWS_* environment (botocore itself honours
                                        AWS_ENDPOINT_URL_SECRETS_MANAGER and AWS_ENDPOINT_URL); the region
                                        defaults to the ARN's, then AWS_REGION, then
                                        botocore's own (AWS_DEFAULT_REGION, the profile).

  k8s://<namespace>/<secret>#<key>     one key of a Kubernetes Secret through the official `kubernetes`
                                        client (`pip install 'runyard[kubernetes]'`): reading gives the
                                        key's value from the Secret's `data` (base64-decoded, UTF-8), None
                                        when the Secret or the key is missing; writing creates the Secret
                                        (type Opaque, that one key) when it is missing, else merge-patches
                                        that key alone (the other keys are left as they are). In a pod
                                        (KUBERNETES_SERVICE_HOST set) the service account is used, else the
                                        kubeconfig (KUBECONFIG, then ~/.kube/config; its current context).

A `Secret`'s `ref` is safe to print; no error message ever holds the value. Another store is one class
with `ref`, `read` and `write` plus an entry in `BACKENDS`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from server.errors import RunyardError
from toolkit.files import FolderNotWritable, os_error, replace_atomically

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ARN_REGION = re.compile(r"^arn:aws[a-z-]*:secretsmanager:([a-z0-9-]+):")
_K8S_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS label
_K8S_NAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_K8S_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
_K8S_TIMEOUT_S = (10, 30)  # connect, read


class Secret(Protocol):
    ref: str  # safe to print: never the value

    def read(self) -> str | None:
        """The value, or None when the secret does not exist yet."""

    def write(self, value: str) -> None:
        """Stores `value` (the whole of it), replacing what was there."""


def _scrub(text: str, value: str | None) -> str:
    return text.replace(value, "***") if value else text


def _invalid(message: str) -> RunyardError:
    return RunyardError(message, "INVALID_PARAMETER_VALUE")


def _check_value(value: object, ref: str) -> str:
    if not isinstance(value, str) or not value:
        raise _invalid(f"Refusing to write an empty secret to {ref}")
    return value


# ---- files --------------------------------------------------------------------------------------------

class FileSecret:
    """A secret kept in a local file (see the module's docstring for modes and atomicity)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(os.path.abspath(Path(path).expanduser()))
        self.ref = str(self.path)

    def read(self) -> str | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error("Cannot read the secret file", self.path, exc) from None
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise RunyardError(f"The secret file {self.ref} is not UTF-8 text", "INVALID_STATE") from None
        if text.endswith("\n"):
            text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
        return text

    def write(self, value: str) -> None:
        value = _check_value(value, self.ref)
        if any(c in value for c in "\r\n\0"):
            raise _invalid(f"A secret kept in a file is one line: refusing a value with a line break or "
                           f"a NUL for {self.ref}")
        target = Path(os.path.realpath(self.path))  # a symlink keeps pointing at the (replaced) file
        try:
            current = os.stat(target)
        except FileNotFoundError:
            current = None
        except OSError as exc:
            raise os_error("Cannot read the secret file", self.path, exc) from None
        try:
            replace_atomically(target, value.encode(), prepare=lambda fd: self._owner_and_mode(fd, current))
        except FolderNotWritable as exc:
            raise os_error("Cannot write in the folder of the secret file", self.path, exc) from None
        except OSError as exc:
            raise os_error("Cannot write the secret file", self.path, exc) from None

    def _owner_and_mode(self, fd: int, current: os.stat_result | None) -> None:
        """New file: ours, 0600. Existing file: its owner and group; 0640 if it had a group bit, else 0600.
        Refuses rather than hand the secret to another owner or group."""
        if current is None:
            return
        if (current.st_uid, current.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(fd, current.st_uid, current.st_gid)
            except PermissionError:
                raise RunyardError(
                    f"Not allowed to give the new {self.ref} its owner id {current.st_uid} and group id "
                    f"{current.st_gid} (run as its owner, in its group, or as root)",
                    "PERMISSION_DENIED") from None
        os.fchmod(fd, 0o640 if stat.S_IMODE(current.st_mode) & stat.S_IRWXG else 0o600)

    def __repr__(self) -> str:
        return f"FileSecret({self.ref!r})"


def _file(ref: str) -> FileSecret:
    if not ref.startswith("file:"):
        return FileSecret(ref)
    parts = urlsplit(ref)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment or not parts.path:
        raise _invalid(f"Invalid secret reference {ref!r}: write a local file as file:///absolute/path")
    return FileSecret(unquote(parts.path))


# ---- AWS Secrets Manager ------------------------------------------------------------------------------

class AwsSecretsManagerSecret:
    """The current SecretString of an AWS Secrets Manager secret."""

    def __init__(self, secret_id: str, region: str | None = None):
        self.secret_id = secret_id
        arn_region = _ARN_REGION.match(secret_id)
        self.region = region or (arn_region.group(1) if arn_region else None)
        self.ref = f"aws-sm://{secret_id}" + (f"?region={region}" if region else "")

    def _client(self):
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=10, read_timeout=30, retries={"mode": "standard", "max_attempts": 3})
        # AWS_REGION as the other AWS SDKs read it (botocore reads only AWS_DEFAULT_REGION and the profile)
        region = self.region or os.environ.get("AWS_REGION") or None
        return boto3.session.Session().client("secretsmanager", region_name=region, config=config)

    def read(self) -> str | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self._client().get_secret_value(SecretId=self.secret_id)
        except ClientError as exc:
            if _code(exc) == "ResourceNotFoundException":  # no such secret, or no current version yet
                return None
            raise self._error("read", exc) from None
        except BotoCoreError as exc:
            raise self._error("read", exc) from None
        if "SecretString" in answer:
            return answer["SecretString"]
        try:
            return bytes(answer["SecretBinary"]).decode()
        except (KeyError, UnicodeDecodeError):
            raise RunyardError(f"The secret {self.ref} holds no text", "INVALID_STATE") from None

    def write(self, value: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        value = _check_value(value, self.ref)
        try:
            client = self._client()
            try:
                client.put_secret_value(SecretId=self.secret_id, SecretString=value)
            except ClientError as exc:
                if _code(exc) != "ResourceNotFoundException" or self.secret_id.startswith("arn:"):
                    raise
                try:
                    client.create_secret(Name=self.secret_id, SecretString=value,
                                         Description="Written by runyard")
                except ClientError as create_exc:
                    if _code(create_exc) != "ResourceExistsException":
                        raise
                    client.put_secret_value(SecretId=self.secret_id, SecretString=value)  # created meanwhile
        except (ClientError, BotoCoreError) as exc:
            raise self._error("write", exc, value) from None

    def _error(self, action: str, exc: Exception, value: str | None = None) -> RunyardError:
        from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

        if isinstance(exc, NoRegionError):
            return RunyardError(f"Cannot {action} {self.ref}: no AWS region (add ?region=… to the reference "
                                "or set AWS_REGION)", "INVALID_PARAMETER_VALUE")
        if isinstance(exc, NoCredentialsError):
            return RunyardError(f"Cannot {action} {self.ref}: no AWS credentials found (AWS_* environment, "
                                "~/.aws, or an instance/pod role)", "PERMISSION_DENIED")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            reason = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
            code = "PERMISSION_DENIED" if error.get("Code") == "AccessDeniedException" else "INVALID_STATE"
        else:
            reason, code = str(exc), "INVALID_STATE"
        reason = " ".join(_scrub(reason, value).split())
        return RunyardError(f"Cannot {action} {self.ref}: {reason}", code)

    def __repr__(self) -> str:
        return f"AwsSecretsManagerSecret({self.ref!r})"


def _code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _aws_sm(ref: str) -> AwsSecretsManagerSecret:
    rest = ref[len("aws-sm://"):]
    rest, _, fragment = rest.partition("#")
    secret_id, _, query = rest.partition("?")
    secret_id = unquote(secret_id)
    if not secret_id or fragment:
        raise _invalid(f"Invalid secret reference {ref!r}: write aws-sm://<secret name or ARN>[?region=…]")
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - {"region"})
    if unknown:
        raise _invalid(f"Invalid secret reference {ref!r}: unknown parameter(s) {', '.join(unknown)}; "
                       "only region is understood")
    if "region" in params and not re.fullmatch(r"[a-z0-9-]+", params["region"]):
        raise _invalid(f"Invalid secret reference {ref!r}: bad region")
    return AwsSecretsManagerSecret(secret_id, params.get("region") or None)


# ---- Kubernetes Secrets -------------------------------------------------------------------------------

class KubernetesSecret:
    """One key of a Kubernetes Secret (see the module's docstring)."""

    def __init__(self, namespace: str, name: str, key: str):
        self.namespace, self.name, self.key = namespace, name, key
        self.ref = f"k8s://{namespace}/{name}#{key}"

    def _api(self):
        """A CoreV1Api on its own configuration (the client's global default is left alone)."""
        try:
            from kubernetes import client, config
        except ImportError:
            raise RunyardError(f"Cannot use {self.ref}: the kubernetes client is not installed "
                               "(pip install 'runyard[kubernetes]')", "INVALID_STATE") from None
        configuration = client.Configuration()
        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=configuration)
            else:
                # KUBECONFIG read now, not when the module was first imported (None: ~/.kube/config)
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                        client_configuration=configuration, persist_config=False)
        except (config.ConfigException, OSError) as exc:
            where = ("the in-cluster service account" if os.environ.get("KUBERNETES_SERVICE_HOST")
                     else "the kubeconfig (KUBECONFIG or ~/.kube/config)")
            reason = " ".join(str(exc).split())
            raise RunyardError(f"Cannot use {self.ref}: no usable Kubernetes configuration from {where}: "
                               f"{reason}", "INVALID_STATE") from None
        return client.ApiClient(configuration), client.CoreV1Api

    def read(self) -> str | None:
        api_client, core = self._api()
        with api_client:
            try:
                secret = core(api_client).read_namespaced_secret(self.name, self.namespace,
                                                                 _request_timeout=_K8S_TIMEOUT_S)
            except Exception as exc:
                if getattr(exc, "status", None) == 404:  # the Secret (or its namespace) does not exist
                    return None
                raise self._error("read", exc, api_client) from None
        raw = (secret.data or {}).get(self.key)
        if raw is None:
            return None
        try:
            return base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise RunyardError(f"The secret {self.ref} holds no UTF-8 text", "INVALID_STATE") from None

    def write(self, value: str) -> None:
        value = _check_value(value, self.ref)
        encoded = base64.b64encode(value.encode()).decode()
        patch = {"data": {self.key: encoded}}  # a JSON merge patch: only this key changes
        api_client, core = self._api()
        with api_client:
            api = core(api_client)
            try:
                try:
                    api.patch_namespaced_secret(self.name, self.namespace, patch,
                                                _content_type="application/merge-patch+json",
                                                _request_timeout=_K8S_TIMEOUT_S)
                    return
                except Exception as exc:
                    if getattr(exc, "status", None) != 404:
                        raise
                body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": self.name, "namespace": self.namespace,
                                     "labels": {"app.kubernetes.io/managed-by": "runyard"}},
                        "data": {self.key: encoded}}
                try:
                    api.create_namespaced_secret(self.namespace, body, _request_timeout=_K8S_TIMEOUT_S)
                except Exception as exc:
                    if getattr(exc, "status", None) != 409:
                        raise
                    api.patch_namespaced_secret(self.name, self.namespace, patch,  # created meanwhile
                                                _content_type="application/merge-patch+json",
                                                _request_timeout=_K8S_TIMEOUT_S)
            except Exception as exc:
                raise self._error("write", exc, api_client, value) from None

    def _error(self, action: str, exc: Exception, api_client, value: str | None = None) -> RunyardError:
        """A RunyardError naming the ref and the API's reason: never the value (nor its base64)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        host = api_client.configuration.host
        if isinstance(exc, ApiException):
            status = exc.status
            message = ""
            try:
                message = json.loads(exc.body or "").get("message", "")
            except (ValueError, AttributeError):
                pass
            reason = f"{status} {exc.reason or ''}".strip() + (f": {message}" if message else "")
            code = {401: "PERMISSION_DENIED", 403: "PERMISSION_DENIED",
                    404: "RESOURCE_DOES_NOT_EXIST"}.get(status or 0, "INVALID_STATE")
            if status == 401:
                reason += " (the credentials in the kubeconfig or service account were refused)"
        elif isinstance(exc, HTTPError | OSError):
            reason, code = f"cannot reach the Kubernetes API at {host}: {type(exc).__name__}", "INVALID_STATE"
        else:
            reason, code = f"{type(exc).__name__}: {exc}", "INVALID_STATE"
        if value:
            reason = _scrub(_scrub(reason, base64.b64encode(value.encode()).decode()), value)
        reason = " ".join(reason.split())
        return RunyardError(f"Cannot {action} {self.ref}: {reason}", code)

    def __repr__(self) -> str:
        return f"KubernetesSecret({self.ref!r})"


def _k8s(ref: str) -> KubernetesSecret:
    rest = ref[len("k8s://"):]
    path, hash_sign, key = rest.partition("#")
    namespace, slash, name = path.partition("/")
    if (not hash_sign or not slash or "?" in rest or not _K8S_NAMESPACE.match(namespace)
            or not _K8S_NAME.match(name) or not _K8S_KEY.match(key)):
        raise _invalid(f"Invalid secret reference {ref!r}: write k8s://<namespace>/<secret-name>#<key> "
                       "(lower-case DNS names; the key made of letters, digits, '-', '_' or '.')")
    return KubernetesSecret(namespace, name, key)


# ---- references ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    example: str  # how a reference looks, for messages
    open: Callable[[str], Secret]


BACKENDS: dict[str, Backend] = {
    "file": Backend("a path or file:///path", _file),
    "aws-sm": Backend("aws-sm://<secret-id>[?region=…]", _aws_sm),
    "k8s": Backend("k8s://<namespace>/<secret-name>#<key>", _k8s),
}


def open_secret(ref: str) -> Secret:
    """The secret a reference names (see the module's docstring). Nothing is read or written yet."""
    if not isinstance(ref, str) or not ref.strip():
        raise _invalid("A secret reference is needed (a file path, aws-sm://<secret-id> or "
                       "k8s://<namespace>/<secret-name>#<key>)")
    scheme = _SCHEME.match(ref)
    name = scheme.group(1).lower() if scheme else "file"
    backend = BACKENDS.get(name)
    if backend is None:
        supported = "; ".join(backend.example for backend in BACKENDS.values())
        raise _invalid(f"Unsupported secret reference scheme {name}://; supported: {supported}")
    return backend.open(ref)
