"""`runyard deploy aws preview|up|destroy|outputs`: the AWS side of a production runyard.

The resources are infra/aws/program.py, run through Pulumi's Automation API as an inline program of the
project "runyard"; the stack is named after the settings' name unless told otherwise. Where the state
lives is Pulumi's business: the CLI's login (`pulumi login`, PULUMI_BACKEND_URL) or `backend_url`.

Before anything starts we check what would otherwise fail late and obscurely: the Pulumi CLI (the
Automation API drives it; it is the operator's install, not a Python package) and AWS credentials. Engine
failures come back as one RunyardError holding the engine's own error lines, with anything that looks like
a secret replaced by ***.

`kubernetes_flags(outputs)` hands the stack outputs to `runyard deploy kubernetes`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from infra.aws.settings import AwsSettings
from server.errors import RunyardError

PROJECT = "runyard"
INSTALL_URL = "https://www.pulumi.com/docs/install/"
INSTALL_COMMAND = "curl -fsSL https://get.pulumi.com | sh"
ROLE_ANNOTATION = "eks.amazonaws.com/role-arn"
_ENGINE_LINES = 15  # enough for Pulumi's diagnostics of a failed resource, short enough to read

NO_CLI = (
    "The Pulumi CLI is not installed (no `pulumi` on PATH, nor in $PULUMI_HOME/bin or ~/.pulumi/bin). "
    "`runyard deploy aws` drives it through Pulumi's Automation API. Install it from "
    f"{INSTALL_URL} (Linux/macOS: `{INSTALL_COMMAND}`, then open a new shell or add ~/.pulumi/bin to PATH) "
    "and run `pulumi login` to choose where the stack state lives. `runyard deploy kubernetes` does not "
    "need it."
)
NO_CREDENTIALS = (
    "No AWS credentials found. `runyard deploy aws` needs an identity allowed to manage S3, RDS, KMS, IAM "
    "and EC2 security groups in region {region}. Give one of: AWS_PROFILE=<profile> (a profile of "
    "~/.aws/config, e.g. from `aws configure`); AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus "
    "AWS_SESSION_TOKEN for temporary keys); IAM Identity Center (SSO): `aws sso login --profile <profile>`, "
    "then AWS_PROFILE=<profile>; or an instance/task role where this runs."
)

OnOutput = Callable[[str], Any]


# ---- what has to be there first ----------------------------------------------------------------------

def require_pulumi_cli() -> str | None:
    """The Pulumi installation root to use: None for the `pulumi` on PATH, else a folder with bin/pulumi."""
    if shutil.which("pulumi"):
        return None
    # The installer puts the CLI in ~/.pulumi/bin ($PULUMI_HOME/bin) and only edits shell profiles, so a
    # fresh install is often not on PATH yet in the shell that runs us.
    for root in (os.environ.get("PULUMI_HOME"), str(Path.home() / ".pulumi")):
        if root and os.access(Path(root, "bin", "pulumi"), os.X_OK) and Path(root, "bin", "pulumi").is_file():
            return root
    raise RunyardError(NO_CLI)


def require_aws_credentials(region: str) -> None:
    """Fails clearly unless boto3's chain (the one the Pulumi AWS provider also follows) yields credentials.
    Nothing about the credentials is ever put into a message: only which variable or profile to fix."""
    import boto3  # here, not at the top: `runyard --help` should not pay for loading botocore
    import botocore.exceptions as boto_errors

    if not region:
        raise RunyardError("No AWS region: set `region` (e.g. eu-west-1) in the aws settings.")
    profile = os.environ.get("AWS_PROFILE")
    try:
        credentials = boto3.Session(region_name=region).get_credentials()
        # SSO and assumed roles resolve lazily: freezing them is what reveals an expired login.
        frozen = credentials.get_frozen_credentials() if credentials is not None else None
    except boto_errors.ProfileNotFound:
        raise RunyardError(f"AWS_PROFILE={profile} names a profile that is not in ~/.aws/config (or "
                           "AWS_CONFIG_FILE): check the name with `aws configure list-profiles`.") from None
    except (boto_errors.SSOError, boto_errors.TokenRetrievalError, boto_errors.UnauthorizedSSOTokenError):
        raise RunyardError(f"The AWS SSO login of profile {profile or 'default'} is missing or expired: run "
                           f"`aws sso login --profile {profile or 'default'}` and try again.") from None
    except boto_errors.BotoCoreError as exc:
        raise RunyardError(f"AWS credentials could not be loaded ({type(exc).__name__}); "
                           + NO_CREDENTIALS.format(region=region)) from None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise RunyardError(NO_CREDENTIALS.format(region=region))


def _automation():
    try:
        from pulumi import automation
    except ImportError:
        raise RunyardError("The Pulumi SDK is not installed: pip install 'runyard[aws]'.") from None
    return automation


# ---- the stack ----------------------------------------------------------------------------------------

def _stack(settings: AwsSettings, stack: str | None, backend_url: str | None, secrets_provider: str | None,
           *, create: bool, run_program: bool = True):
    """The stack, after the checks. `create`: a missing stack is created (preview, up) rather than an
    error (destroy, outputs). Without `run_program` (outputs) no AWS call is made: no credentials needed."""
    root = require_pulumi_cli()
    if run_program:
        require_aws_credentials(settings.region)
    auto = _automation()
    from infra.aws.program import build

    name = stack or settings.name
    try:
        # Runs `pulumi version` and refuses a CLI older than this SDK needs.
        command = auto.PulumiCommand(root=root)
    except auto.InvalidVersionError as exc:
        raise RunyardError(f"The Pulumi CLI is too old for this SDK ({exc}): upgrade it ({INSTALL_URL}, "
                           f"`{INSTALL_COMMAND}`).") from None
    except (OSError, subprocess.CalledProcessError) as exc:
        where = Path(root, "bin", "pulumi") if root else shutil.which("pulumi")
        raise RunyardError(f"The Pulumi CLI at {where} does not run (`pulumi version`: "
                           f"{_short_reason(exc)}); reinstall it from {INSTALL_URL}.") from None
    project = auto.ProjectSettings(name=PROJECT, runtime="python",
                                   backend=auto.ProjectBackend(backend_url) if backend_url else None)
    options = auto.LocalWorkspaceOptions(project_settings=project, secrets_provider=secrets_provider,
                                         pulumi_command=command)
    open_stack = auto.create_or_select_stack if create else auto.select_stack
    try:
        selected = open_stack(stack_name=name, project_name=PROJECT, program=lambda: build(settings),
                              opts=options)
        if run_program:
            selected.set_config("aws:region", auto.ConfigValue(value=settings.region))
            # The provider plugin that matches the installed pulumi-aws, so the engine never picks another.
            selected.workspace.install_plugin("aws", f"v{metadata.version('pulumi_aws')}")
    except auto.StackNotFoundError:
        raise RunyardError(f"There is no stack {name} in this Pulumi backend: run `runyard deploy aws up` "
                           "first, or check the name and `pulumi whoami --verbose`.") from None
    except auto.CommandError as exc:
        raise engine_error(exc, "select the stack", name) from None
    return selected


def preview(settings: AwsSettings, *, stack: str | None = None, backend_url: str | None = None,
            secrets_provider: str | None = None, on_output: OnOutput | None = None) -> dict[str, int]:
    """What `up` would change: {"create": 17, …}. Nothing is changed."""
    selected = _stack(settings, stack, backend_url, secrets_provider, create=True)
    auto = _automation()
    try:
        result = selected.preview(on_output=on_output, color="never", diff=False)
    except auto.CommandError as exc:
        raise engine_error(exc, "preview", selected.name) from None
    return {_op_name(op): count for op, count in result.change_summary.items()}


def up(settings: AwsSettings, *, stack: str | None = None, backend_url: str | None = None,
       secrets_provider: str | None = None, on_output: OnOutput | None = None) -> dict[str, Any]:
    """Creates or updates the resources; returns the stack outputs (see infra/aws/program.py)."""
    selected = _stack(settings, stack, backend_url, secrets_provider, create=True)
    auto = _automation()
    try:
        result = selected.up(on_output=on_output, color="never")
    except auto.CommandError as exc:
        raise engine_error(exc, "up", selected.name) from None
    return _plain(result.outputs)


def destroy(settings: AwsSettings, *, stack: str | None = None, backend_url: str | None = None,
            secrets_provider: str | None = None, on_output: OnOutput | None = None) -> dict[str, int]:
    """Deletes what the stack holds. The database (deletion protection) and a non-empty bucket refuse."""
    selected = _stack(settings, stack, backend_url, secrets_provider, create=False)
    auto = _automation()
    try:
        result = selected.destroy(on_output=on_output, color="never")
    except auto.CommandError as exc:
        message = engine_error(exc, "destroy", selected.name).message + (
            "\nBy design the database has deletion protection and destroy never empties the artifacts "
            "bucket: to really delete the data, turn deletion protection off and empty the bucket yourself, "
            "then run destroy again.")
        raise RunyardError(message) from None
    return {_op_name(op): count for op, count in (result.summary.resource_changes or {}).items()}


def outputs(settings: AwsSettings, *, stack: str | None = None, backend_url: str | None = None,
            secrets_provider: str | None = None) -> dict[str, Any]:
    """The outputs of the last `up`, from the state alone: no program run, no AWS credentials needed."""
    selected = _stack(settings, stack, backend_url, secrets_provider, create=False, run_program=False)
    auto = _automation()
    try:
        return _plain(selected.outputs())
    except auto.CommandError as exc:
        raise engine_error(exc, "read the outputs", selected.name) from None


def _plain(values: dict) -> dict[str, Any]:
    # The program exports no secret; should one ever appear it stays hidden here too.
    return {name: "***" if item.secret else item.value for name, item in values.items()}


def _op_name(op: Any) -> str:
    return str(getattr(op, "value", op))


# ---- handing over to `runyard deploy kubernetes` -------------------------------------------------------

def kubernetes_flags(stack_outputs: dict[str, Any]) -> dict[str, Any]:
    """The stack outputs as `runyard deploy kubernetes` settings (the KubernetesSettings field names), plus
    the password secret's ARN and a note for the operator: the password itself never passes through us."""
    required = ("backend_store_uri", "artifacts_destination", "server_role_arn", "db_password_secret_arn")
    missing = [key for key in required if not stack_outputs.get(key)]
    if missing:
        raise RunyardError(f"The AWS stack has no output {', '.join(missing)}: run `runyard deploy aws up` "
                           "first (or check the stack name).")
    secret_arn = stack_outputs["db_password_secret_arn"]
    irsa = stack_outputs.get("server_role_trust", "irsa") == "irsa"
    return {
        "backend_store_uri": stack_outputs["backend_store_uri"],
        "artifacts_destination": stack_outputs["artifacts_destination"],
        # With Pod Identity the association made by the stack does the binding: no annotation.
        "service_account_annotations": {ROLE_ANNOTATION: stack_outputs["server_role_arn"]} if irsa else {},
        "aws_region": stack_outputs.get("region"),
        "db_password_secret_arn": secret_arn,
        "note": (f"The database password lives in AWS Secrets Manager ({secret_arn}), generated and "
                 "rotated by RDS as JSON {\"username\", \"password\"}. Sync its `password` property into "
                 "a Kubernetes Secret (e.g. an External Secrets Operator ExternalSecret) and pass it as "
                 "--backend-store-password-secret SECRET/KEY; runyard never sees it."),
    }


# ---- engine errors ------------------------------------------------------------------------------------

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "PULUMI_ACCESS_TOKEN",
               "PULUMI_CONFIG_PASSPHRASE")
_SCRUB = [
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "***"),  # AWS access key ids
    (re.compile(r"\bpul-[0-9a-f]{40}\b"), "***"),  # Pulumi access tokens
    (re.compile(r"(://[^/\s:@]+):[^@\s/]+@"), r"\1:***@"),  # passwords in URLs
    (re.compile(r"(?i)\b([\w-]*(?:password|passwd|secret|token|passphrase)[\w-]*[\"']?\s*[:=]\s*[\"']?)"
                r"(?!arn:)[^\s\"',;&]+"), r"\1***"),
]


def scrub(text: str) -> str:
    """The text with credentials the environment holds, and anything shaped like a credential, hidden."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    for pattern, replacement in _SCRUB:
        text = pattern.sub(replacement, text)
    return text


def engine_error(exc: Exception, action: str, stack: str) -> RunyardError:
    """A Pulumi CommandError as one readable RunyardError: the engine's error lines, secrets scrubbed."""
    text = str(exc)
    stdout, _, stderr = text.partition("\n stderr: ")
    stdout = stdout.partition("\n stdout: ")[2] or stdout
    lines = [line.rstrip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = list(dict.fromkeys(line.strip() for line in lines if "error" in line.lower()))
    chosen = errors[:_ENGINE_LINES] or lines[-_ENGINE_LINES:]
    detail = scrub("\n".join(chosen)) or type(exc).__name__
    return RunyardError(f"pulumi {action} of stack {stack} failed:\n{detail}")


def _short_reason(exc: Exception) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        return f"exit status {exc.returncode}"
    return scrub(str(exc))
