"""toolkit/secrets.py: secrets in files (modes, atomic replacement) and in AWS Secrets Manager (a real
moto server over HTTP)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
from helpers.moto_server import moto_server, secretsmanager, use_moto

from server.errors import RunyardError
from toolkit import secrets as secret_store
from toolkit.secrets import AwsSecretsManagerSecret, FileSecret, open_secret

VALUE = "s3cr3t-Value_with.symbols+/="


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- references ---------------------------------------------------------------------------------------

def test_references_pick_the_backend(tmp_path):
    assert isinstance(open_secret(str(tmp_path / "pw")), FileSecret)
    assert open_secret(f"file://{tmp_path}/pw").ref == str(tmp_path / "pw")
    assert open_secret(f"file://localhost{tmp_path}/p%20w").ref == str(tmp_path / "p w")
    aws = open_secret("aws-sm://runyard/db-password?region=eu-west-1")
    assert isinstance(aws, AwsSecretsManagerSecret)
    assert (aws.secret_id, aws.region, aws.ref) == ("runyard/db-password", "eu-west-1",
                                                    "aws-sm://runyard/db-password?region=eu-west-1")
    arn = "arn:aws:secretsmanager:us-east-2:123456789012:secret:runyard-db-AbCdEf"
    assert open_secret(f"aws-sm://{arn}").region == "us-east-2"


@pytest.mark.parametrize("ref, words", [
    ("vault://x", ["vault://", "supported", "k8s://", "aws-sm://"]),
    ("k8s://runyard/db", ["k8s://<namespace>/<secret-name>#<key>"]),
    ("file://otherhost/etc/pw", ["file:///absolute/path"]),
    ("aws-sm://", ["aws-sm://<secret name or ARN>"]),
    ("aws-sm://name?profile=x", ["unknown parameter", "profile"]),
    ("aws-sm://name#password", ["aws-sm://<secret name or ARN>"]),
    ("", ["secret reference is needed"]),
])
def test_bad_references_are_clear_errors(ref, words):
    with pytest.raises(RunyardError) as caught:
        open_secret(ref)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    for word in words:
        assert word in caught.value.message


def test_backends_are_a_table_a_new_scheme_can_join(tmp_path, monkeypatch):
    opened = []

    def opener(ref):
        opened.append(ref)
        return FileSecret(tmp_path / "k8s")

    monkeypatch.setitem(secret_store.BACKENDS, "k8s", secret_store.Backend("k8s://ns/name#key", opener))
    open_secret("k8s://ns/name#key").write("x")
    assert opened == ["k8s://ns/name#key"]
    with pytest.raises(RunyardError, match="k8s://ns/name#key"):  # listed among the supported ones
        open_secret("nope://x")


# ---- files --------------------------------------------------------------------------------------------

def test_a_missing_file_reads_as_none_and_is_created_0600(tmp_path):
    secret = open_secret(str(tmp_path / "db-password"))
    assert secret.read() is None
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        secret.write(VALUE)
    finally:
        os.umask(old_umask)
    assert secret.read() == VALUE
    assert (tmp_path / "db-password").read_bytes() == VALUE.encode()
    assert _mode(tmp_path / "db-password") == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["db-password"]  # no temporary file left


def test_a_trailing_newline_is_not_part_of_the_value(tmp_path):
    path = tmp_path / "pw"
    for content, expected in [("abc\n", "abc"), ("abc\r\n", "abc"), ("abc", "abc"), ("a b \n", "a b ")]:
        path.write_text(content)
        assert FileSecret(path).read() == expected


@pytest.mark.parametrize("before, after", [(0o644, 0o640), (0o600, 0o600), (0o640, 0o640), (0o660, 0o640),
                                           (0o604, 0o600), (0o400, 0o600)])
def test_an_existing_file_is_never_left_more_open_than_0640(tmp_path, before, after):
    path = tmp_path / "pw"
    path.write_text("old\n")
    path.chmod(before)
    FileSecret(path).write("new")
    assert _mode(path) == after
    assert FileSecret(path).read() == "new"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_an_existing_file_keeps_its_owner_and_group(tmp_path):
    path = tmp_path / "pw"
    path.write_text("old")
    os.chown(path, 65534, 65534)
    path.chmod(0o640)
    FileSecret(path).write("new")
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, _mode(path)) == (65534, 65534, 0o640)


def test_a_symlink_keeps_pointing_at_the_replaced_file(tmp_path):
    (tmp_path / "real").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    FileSecret(tmp_path / "link").write("new")
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real").read_text() == "new"


def test_the_write_is_atomic_readers_see_old_or_new_never_a_mix(tmp_path):
    """A file replaced by rename: concurrent readers only ever see one whole value or the other."""
    path = tmp_path / "pw"
    values = ["a" * 4096, "b" * 8192]
    FileSecret(path).write(values[0])
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(FileSecret(path).read())

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(300):
            FileSecret(path).write(values[i % 2])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert seen <= set(values)
    assert len(list(tmp_path.iterdir())) == 1


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "pw"
    FileSecret(path).write("old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(secret_store.os, "fsync", broken_fsync)
    with pytest.raises(RunyardError) as caught:
        FileSecret(path).write("new-value-that-must-not-leak")
    monkeypatch.undo()
    assert "new-value-that-must-not-leak" not in caught.value.message
    assert "Input/output error" in caught.value.message
    assert FileSecret(path).read() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["pw"]


def test_file_values_are_one_non_empty_line(tmp_path):
    secret = FileSecret(tmp_path / "pw")
    for bad in ["", "two\nlines", "nul\0"]:
        with pytest.raises(RunyardError) as caught:
            secret.write(bad)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert secret.read() is None


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RunyardError) as caught:
        FileSecret(tmp_path / "nowhere" / "pw").write(VALUE)
    assert str(tmp_path / "nowhere" / "pw") in caught.value.message
    assert VALUE not in caught.value.message


# ---- AWS Secrets Manager (moto server) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(moto_endpoint, monkeypatch):
    use_moto(monkeypatch, moto_endpoint)
    return moto_endpoint


def test_aws_secret_missing_then_created_then_updated(aws_env, request):
    name = f"runyard/{request.node.name}"
    secret = open_secret(f"aws-sm://{name}")
    assert secret.read() is None
    secret.write(VALUE)  # created
    assert secret.read() == VALUE
    secret.write("second")  # a new version
    assert secret.read() == "second"
    stored = secretsmanager(aws_env).get_secret_value(SecretId=name)
    assert stored["SecretString"] == "second"
    versions = secretsmanager(aws_env).list_secret_version_ids(SecretId=name)["Versions"]
    assert len(versions) == 2


def test_aws_secret_by_arn_and_region_from_the_ref(aws_env, request, monkeypatch):
    name = f"runyard-{request.node.name}"
    created = secretsmanager(aws_env, "eu-west-1").create_secret(Name=name, SecretString="v1")
    monkeypatch.delenv("AWS_REGION")
    assert open_secret(f"aws-sm://{created['ARN']}").read() == "v1"  # region from the ARN
    by_name = open_secret(f"aws-sm://runyard-{request.node.name}?region=eu-west-1")
    by_name.write("v2")
    assert by_name.read() == "v2"
    # the same name in another region is another secret
    assert open_secret(f"aws-sm://runyard-{request.node.name}?region=us-west-2").read() is None


def test_aws_secret_endpoint_from_aws_endpoint_url(aws_env, monkeypatch, request):
    monkeypatch.delenv("AWS_ENDPOINT_URL_SECRETS_MANAGER")
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env)
    secret = open_secret(f"aws-sm://runyard/{request.node.name}")
    secret.write(VALUE)
    stored = secretsmanager(aws_env).get_secret_value(SecretId=f"runyard/{request.node.name}")
    assert stored["SecretString"] == VALUE


def test_aws_errors_are_clear_and_hold_no_value(aws_env, monkeypatch, request):
    # A missing ARN cannot be created (an ARN is not a name).
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:missing-AbCdEf"
    with pytest.raises(RunyardError) as caught:
        open_secret(f"aws-sm://{arn}").write(VALUE)
    assert "ResourceNotFoundException" in caught.value.message and VALUE not in caught.value.message
    # No region at all.
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(RunyardError, match="no AWS region"):
        open_secret("aws-sm://runyard/x").read()
    # No credentials.
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(RunyardError, match="no AWS credentials") as caught:
        open_secret(f"aws-sm://runyard/{request.node.name}").write(VALUE)
    assert VALUE not in caught.value.message
    # Nothing listening.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RunyardError) as caught:
        open_secret(f"aws-sm://runyard/{request.node.name}").write(VALUE)
    assert "Could not connect" in caught.value.message and VALUE not in caught.value.message
