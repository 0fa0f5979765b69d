"""`runyard deploy aws` before and after the engine: the refusals an operator meets first (no Pulumi CLI,
no AWS credentials), engine errors without secrets, and the hand-over to `runyard deploy kubernetes`.

This machine has no Pulumi CLI and no AWS account, so the refusals are the real thing: the tests only
shape the environment (PATH, HOME, AWS_* variables), never our functions.
"""

from __future__ import annotations

import os
import stat
from dataclasses import fields
from pathlib import Path

import pytest
from pulumi.automation import CommandError
from pulumi.automation._cmd import CommandResult

from infra.aws.settings import AwsSettings
from infra.k8s.settings import KubernetesSettings
from server.errors import RunyardError
from toolkit.deploy import aws

SETTINGS = AwsSettings(name="runyard-prod", region="eu-west-1", vpc_id="vpc-0123456789abcdef0",
                       private_subnet_ids=("subnet-0aaaaaaaaaaaaaaa1", "subnet-0bbbbbbbbbbbbbbb2"))
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
COMMANDS = [aws.preview, aws.up, aws.destroy, aws.outputs]


@pytest.fixture
def no_aws(monkeypatch, tmp_path) -> Path:
    """No credentials anywhere boto3 looks: no AWS_* variables, empty config files, no instance metadata."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s wait on 169.254.169.254
    return home


@pytest.fixture
def no_pulumi(monkeypatch, tmp_path, no_aws) -> Path:
    """PATH is one empty folder, PULUMI_HOME another, HOME has no ~/.pulumi: no CLI to be found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("PULUMI_HOME", str(tmp_path / "pulumi-home"))
    return empty


def _executable(path: Path, script: str = "#!/bin/sh\nexit 3\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ---- the Pulumi CLI -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.__name__)
def test_every_command_says_how_to_install_the_pulumi_cli(no_pulumi, command):
    with pytest.raises(RunyardError) as caught:
        command(SETTINGS)
    message = caught.value.message
    assert "Pulumi CLI is not installed" in message
    assert "https://www.pulumi.com/docs/install/" in message
    assert "curl -fsSL https://get.pulumi.com | sh" in message
    assert "`runyard deploy kubernetes` does not need it" in message


def test_the_cli_is_found_where_the_installer_puts_it(no_pulumi, tmp_path, monkeypatch):
    pulumi_home = tmp_path / "pulumi-home"
    _executable(pulumi_home / "bin" / "pulumi")
    assert aws.require_pulumi_cli() == str(pulumi_home)

    monkeypatch.delenv("PULUMI_HOME")
    with pytest.raises(RunyardError, match="not installed"):
        aws.require_pulumi_cli()
    default_home = Path(os.environ["HOME"]) / ".pulumi"
    _executable(default_home / "bin" / "pulumi")
    assert aws.require_pulumi_cli() == str(default_home)

    _executable(no_pulumi / "pulumi")  # on PATH: the Automation API's own default
    assert aws.require_pulumi_cli() is None


def test_a_cli_file_that_cannot_be_executed_does_not_count(no_pulumi, tmp_path):
    (tmp_path / "pulumi-home" / "bin").mkdir(parents=True)
    (tmp_path / "pulumi-home" / "bin" / "pulumi").write_text("not a program")
    with pytest.raises(RunyardError, match="not installed"):
        aws.require_pulumi_cli()


# ---- AWS credentials ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [aws.preview, aws.up, aws.destroy], ids=lambda command: command.__name__)
def test_missing_credentials_name_every_way_to_give_them(no_pulumi, command):
    _executable(no_pulumi / "pulumi")  # a CLI is there (never run: the credentials are checked first)
    with pytest.raises(RunyardError) as caught:
        command(SETTINGS)
    message = caught.value.message
    assert message.startswith("No AWS credentials found.")
    for hint in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "aws sso login", "eu-west-1"):
        assert hint in message, hint


def test_an_unknown_profile_is_named(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "production")
    with pytest.raises(RunyardError) as caught:
        aws.require_aws_credentials("eu-west-1")
    assert "AWS_PROFILE=production names a profile that is not in ~/.aws/config" in caught.value.message


def test_an_sso_profile_without_a_login_says_to_log_in(no_aws, monkeypatch, tmp_path):
    (tmp_path / "aws-config").write_text(
        "[profile platform]\nsso_start_url = https://example.awsapps.com/start\nsso_region = eu-west-1\n"
        "sso_account_id = 123456789012\nsso_role_name = Deployer\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_PROFILE", "platform")
    with pytest.raises(RunyardError) as caught:
        aws.require_aws_credentials("eu-west-1")
    assert "run `aws sso login --profile platform`" in caught.value.message


def test_keys_in_the_environment_pass_and_are_never_echoed(no_pulumi, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    aws.require_aws_credentials("eu-west-1")
    # Past both checks the CLI itself is run: this one is broken, and says so without any credential.
    cli = _executable(no_pulumi / "pulumi", f"#!/bin/sh\necho {SECRET_KEY} {ACCESS_KEY}\nexit 3\n")
    with pytest.raises(RunyardError) as caught:
        aws.preview(SETTINGS)
    message = caught.value.message
    assert f"The Pulumi CLI at {cli} does not run" in message and "exit status 3" in message
    assert SECRET_KEY not in message and ACCESS_KEY not in message


def test_reading_outputs_needs_no_aws_credentials(no_pulumi):
    # Outputs come from Pulumi's state: past the CLI check the next step is running the CLI itself.
    _executable(no_pulumi / "pulumi")
    with pytest.raises(RunyardError) as caught:
        aws.outputs(SETTINGS)
    assert "does not run" in caught.value.message and "AWS" not in caught.value.message


# ---- engine errors ------------------------------------------------------------------------------------

def test_engine_errors_keep_the_reason_and_lose_the_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    stdout = (
        "Updating (runyard-prod):\n"
        " +  aws:rds:Instance runyard-prod-postgres creating (12s)\n"
        f"    debug: signing with {ACCESS_KEY} and {SECRET_KEY}\n"
        "Diagnostics:\n"
        "  aws:rds:Instance (runyard-prod-postgres):\n"
        "    error: creating RDS DB Instance (runyard-prod-postgres): InvalidParameterCombination: "
        "RDS does not support creating a DB instance with the following combination: "
        "DBInstanceClass=db.t4g.micro, Engine=postgres, EngineVersion=16.4\n"
        "    error: connecting to postgresql://runyard:hunter2-hunter2@db.example:5432/runyard failed, "
        "password=swordfish-2 token: pul-0123456789abcdef0123456789abcdef01234567\n"
    )
    error = aws.engine_error(CommandError(CommandResult(stdout, "error: update failed\n", 255)), "up",
                             "runyard-prod")
    message = error.message
    assert message.startswith("pulumi up of stack runyard-prod failed:")
    assert "InvalidParameterCombination" in message and "error: update failed" in message
    for secret in (SECRET_KEY, ACCESS_KEY, "hunter2-hunter2", "swordfish-2", "pul-0123456789abcdef"):
        assert secret not in message, secret
    assert "postgresql://runyard:***@db.example" in message


def test_engine_errors_without_error_lines_keep_the_tail():
    result = CommandResult("line\n" * 40 + "the stack is currently locked by 1 lock(s)\n", "", 255)
    message = aws.engine_error(CommandError(result), "preview", "runyard-prod").message
    assert message.endswith("the stack is currently locked by 1 lock(s)")
    assert message.count("line") <= 15


# ---- the hand-over to `runyard deploy kubernetes` -----------------------------------------------------

OUTPUTS = {
    "region": "eu-west-1",
    "bucket_name": "runyard-prod-artifacts-1a2b3c4",
    "artifacts_destination": "s3://runyard-prod-artifacts-1a2b3c4/artifacts",
    "backend_store_uri": "postgresql://runyard@runyard-prod-postgres.cabc.eu-west-1.rds.amazonaws.com:5432/"
                         "runyard?sslmode=require",
    "db_password_secret_arn": "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-1234-AbCdEf",
    "server_role_arn": "arn:aws:iam::123456789012:role/runyard-prod-server-1a2b3c4",
    "server_role_trust": "irsa",
    "server_security_group_id": "sg-0123456789abcdef0",
}


def test_kubernetes_flags_with_irsa():
    flags = aws.kubernetes_flags(OUTPUTS)
    assert flags["backend_store_uri"] == OUTPUTS["backend_store_uri"]
    assert flags["artifacts_destination"] == OUTPUTS["artifacts_destination"]
    assert flags["service_account_annotations"] == {"eks.amazonaws.com/role-arn": OUTPUTS["server_role_arn"]}
    assert flags["aws_region"] == "eu-west-1"
    assert flags["db_password_secret_arn"] == OUTPUTS["db_password_secret_arn"]
    assert OUTPUTS["db_password_secret_arn"] in flags["note"]
    assert "--backend-store-password-secret" in flags["note"]


def test_kubernetes_flags_with_pod_identity_need_no_annotation():
    flags = aws.kubernetes_flags({**OUTPUTS, "server_role_trust": "eks-pod-identity"})
    assert flags["service_account_annotations"] == {}


def test_kubernetes_flags_are_kubernetes_settings():
    # The keys meant for `runyard deploy kubernetes` are its settings' own field names.
    flags = aws.kubernetes_flags(OUTPUTS)
    settings_keys = {"backend_store_uri", "artifacts_destination", "service_account_annotations"}
    assert settings_keys <= {item.name for item in fields(KubernetesSettings)}
    assert set(flags) - settings_keys == {"aws_region", "db_password_secret_arn", "note"}


def test_kubernetes_flags_need_an_applied_stack():
    with pytest.raises(RunyardError) as caught:
        aws.kubernetes_flags({"region": "eu-west-1"})
    assert "no output backend_store_uri, artifacts_destination" in caught.value.message
    assert "runyard deploy aws up" in caught.value.message
