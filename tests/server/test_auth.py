"""The server's side of authentication behind NGINX: the bearer-token check auth_request calls, tokens in
the backend store (`runyard tokens`), and X-Forwarded-User from trusted proxies only."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
import requests
import sqlalchemy as sa
from helpers.cli import clean_env, cli_command, run_cli

from server.store.uri import create_engine

API = "/api/2.0/mlflow"
AUTH = "/_runyard/auth"


def _create_token(backend_uri: str, *flags: str, env: dict | None = None) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    result = run_cli("tokens", "create", "--name", name, "--backend-store-uri", backend_uri, *flags, env=env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.startswith("ryt_") and "\n" not in token
    return token


def _check(server, token: str | None, prefix: str = "") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.get(f"{server.url}{prefix}{AUTH}", headers=headers)


def test_token_check_accepts_a_created_token_and_names_its_user(server_factory):
    server = server_factory()
    token = _create_token(server.backend_uri, "--user", "alice")
    answer = _check(server, token)
    assert answer.status_code == 200
    assert answer.headers["x-runyard-user"] == "alice"
    assert answer.content == b""


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ryt_not-a-token", "Basic YWxpY2U6cHc=",
                                    "Bearer " + "ryt_" + "A" * 300])
def test_token_check_refuses_anything_else(server, header):
    answer = requests.get(f"{server.url}{AUTH}", headers={"Authorization": header} if header else {})
    assert answer.status_code == 401
    assert "x-runyard-user" not in answer.headers


def test_revoked_token_stops_working_on_the_next_request(server_factory):
    server = server_factory()
    result = run_cli("tokens", "create", "--name", "ci", "--backend-store-uri", server.backend_uri)
    token = result.stdout.strip()
    assert _check(server, token).status_code == 200
    revoked = run_cli("tokens", "revoke", "ci", "--backend-store-uri", server.backend_uri)
    assert revoked.returncode == 0, revoked.stderr
    assert _check(server, token).status_code == 401
    # Refusals are logged; successful checks are not (NGINX makes one before every request).
    assert "GET /_runyard/auth 401" in server.log() and "GET /_runyard/auth 200" not in server.log()
    again = run_cli("tokens", "revoke", "ci", "--backend-store-uri", server.backend_uri)
    assert again.returncode == 1 and "No token named 'ci'" in again.stderr


def test_expired_token_is_refused_and_listed_as_expired(server_factory):
    server = server_factory()
    token = _create_token(server.backend_uri, "--expires", "2s")
    assert _check(server, token).status_code == 200
    time.sleep(2.2)
    assert _check(server, token).status_code == 401
    listing = run_cli("tokens", "list", "--json", "--backend-store-uri", server.backend_uri)
    [row] = json.loads(listing.stdout)["tokens"]
    assert row["status"] == "expired"


def test_only_a_keyed_hash_of_the_token_is_stored(server_factory, tmp_path):
    pepper = tmp_path / "pepper"
    pepper.write_text("a-long-random-secret\n")
    server = server_factory(None, "--token-pepper-file", str(pepper))
    token = _create_token(server.backend_uri, "--pepper-file", str(pepper))
    assert _check(server, token).status_code == 200
    engine = create_engine(server.backend_uri)
    with engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM access_tokens"))]
    engine.dispose()
    assert stored and token not in repr(stored) and token[4:] not in repr(stored)
    # The same token hashed without the pepper matches nothing: a database copy alone is not enough.
    other = server_factory(server.backend_uri)
    assert _check(other, token).status_code == 401


def test_token_listing_never_shows_tokens(server_factory):
    server = server_factory()
    token = _create_token(server.backend_uri, "--user", "bob", "--expires", "90d")
    assert _check(server, token).status_code == 200
    [row] = json.loads(run_cli("tokens", "list", "--json", "--backend-store-uri", server.backend_uri).stdout
                       )["tokens"]
    assert row["user"] == "bob" and row["last_used_time"] >= row["created_time"]
    for args in (("tokens", "list"), ("tokens", "list", "--json")):
        result = run_cli(*args, "--backend-store-uri", server.backend_uri)
        assert result.returncode == 0 and "bob" in result.stdout
        assert token not in result.stdout + result.stderr and token[4:20] not in result.stdout


@pytest.mark.parametrize("flags, message", [
    (("--name", "bad name"), "Invalid token name"),
    (("--name", "ok", "--user", "a:b"), "Invalid user name"),
    (("--name", "ok", "--expires", "soon"), "Invalid duration"),
    (("--name", "ok", "--expires", "0d"), "Invalid duration"),
])
def test_token_creation_refuses_bad_input(tmp_path, flags, message):
    result = run_cli("tokens", "create", *flags, "--backend-store-uri", str(tmp_path / "store"))
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_token_names_are_unique(tmp_path):
    store = str(tmp_path / "store")
    assert run_cli("tokens", "create", "--name", "ci", "--backend-store-uri", store).returncode == 0
    again = run_cli("tokens", "create", "--name", "ci", "--backend-store-uri", store)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_token_check_under_a_static_prefix(server_factory):
    server = server_factory(None, "--static-prefix", "/mlflow")
    token = _create_token(server.backend_uri)
    assert _check(server, token, "/mlflow").status_code == 200
    assert _check(server, token).status_code == 404


def _run_as(server, user_id: str, headers: dict) -> dict:
    exp = requests.post(f"{server.url}{API}/experiments/create", json={"name": uuid.uuid4().hex},
                        headers=headers).json()["experiment_id"]
    run = requests.post(f"{server.url}{API}/runs/create", headers=headers, json={
        "experiment_id": exp, "user_id": user_id, "tags": [{"key": "mlflow.user", "value": user_id}]}).json()
    return requests.get(f"{server.url}{API}/runs/get", params={"run_id": run["run"]["info"]["run_id"]}).json()


def _owner(run: dict) -> tuple[str, str]:
    tags = {t["key"]: t["value"] for t in run["run"]["data"]["tags"]}
    return run["run"]["info"]["user_id"], tags["mlflow.user"]


def test_forwarded_user_from_a_trusted_proxy_owns_the_run(server_factory):
    server = server_factory(None, "--trusted-proxies", "127.0.0.1,::1")
    run = _run_as(server, "laptop-login", {"X-Forwarded-User": "alice"})
    assert _owner(run) == ("alice", "alice")
    assert "user=alice" in server.log()
    # No header: the client's own claim stands, as with plain MLflow.
    assert _owner(_run_as(server, "laptop-login", {})) == ("laptop-login", "laptop-login")


@pytest.mark.parametrize("flags", [(), ("--trusted-proxies", "10.0.0.0/8")])
def test_forwarded_user_from_anyone_else_is_ignored(server_factory, flags):
    server = server_factory(None, *flags)
    run = _run_as(server, "laptop-login", {"X-Forwarded-User": "mallory"})
    assert _owner(run) == ("laptop-login", "laptop-login")
    assert "mallory" not in server.log()


def test_bad_trusted_proxy_is_refused_at_start(tmp_path):
    result = run_cli("server", "--backend-store-uri", str(tmp_path / "s"), "--trusted-proxies", "nginx-box")
    assert result.returncode == 2 and "--trusted-proxies" in result.stderr


def test_missing_pepper_file_is_refused_at_start(tmp_path):
    result = run_cli("server", "--backend-store-uri", str(tmp_path / "s"),
                     "--token-pepper-file", str(tmp_path / "nope"))
    assert result.returncode == 1 and "Cannot read the token pepper file" in result.stderr


def _add_user(htpasswd, name: str, password: str, command: str = "add"):
    result = subprocess.run(cli_command("users", command, name, "--htpasswd", str(htpasswd),
                                        "--password-stdin"),
                            input=password + "\n", capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    return result


def _basic(server, user: str, password: str) -> requests.Response:
    return requests.get(f"{server.url}{AUTH}", auth=(user, password))


def test_basic_credentials_are_checked_against_the_htpasswd_file(server_factory, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    _add_user(htpasswd, "alice", "correct horse")
    server = server_factory(None, "--htpasswd", str(htpasswd))
    answer = _basic(server, "alice", "correct horse")
    assert answer.status_code == 200 and answer.headers["x-runyard-user"] == "alice"
    assert _basic(server, "alice", "correct horse").status_code == 200  # remembered: no second hash
    assert _basic(server, "alice", "wrong").status_code == 401
    assert _basic(server, "bob", "correct horse").status_code == 401
    assert requests.get(f"{server.url}{AUTH}", headers={"Authorization": "Basic %%%"}).status_code == 401


def test_changed_and_removed_passwords_stop_working_without_a_restart(server_factory, tmp_path):
    htpasswd = tmp_path / "htpasswd"
    _add_user(htpasswd, "alice", "first password")
    server = server_factory(None, "--htpasswd", str(htpasswd))
    assert _basic(server, "alice", "first password").status_code == 200
    _add_user(htpasswd, "alice", "second password", command="passwd")
    assert _basic(server, "alice", "first password").status_code == 401
    assert _basic(server, "alice", "second password").status_code == 200
    removed = run_cli("users", "remove", "alice", "--htpasswd", str(htpasswd))
    assert removed.returncode == 0, removed.stderr
    assert _basic(server, "alice", "second password").status_code == 401


def test_basic_credentials_are_refused_without_an_htpasswd_file(server):
    assert _basic(server, "alice", "anything").status_code == 401


def test_unreadable_htpasswd_file_is_refused_at_start(tmp_path):
    result = run_cli("server", "--backend-store-uri", str(tmp_path / "s"), "--htpasswd", str(tmp_path / "no"))
    assert result.returncode == 1 and "Cannot read the htpasswd file" in result.stderr
