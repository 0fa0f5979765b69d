"""`runyard users` and `runyard nginx render|check` as operators type them: passwords from stdin or a
prompt only, clear refusals, and a configuration nginx accepts."""

from __future__ import annotations

import json
import os
import subprocess

from helpers.cli import clean_env, cli_command, run_cli
from helpers.ports import free_port

from toolkit import htpasswd as users


def _users(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("users", *args), input=stdin, capture_output=True, text=True,
                          env=clean_env(), timeout=60)


def test_users_round_trip_never_shows_passwords_or_hashes(tmp_path):
    htpasswd = str(tmp_path / "htpasswd")
    for name in ("alice", "bob"):
        added = _users("add", name, "--htpasswd", htpasswd, "--password-stdin", stdin="pw-of-" + name + "\n")
        assert added.returncode == 0, added.stderr
    assert os.stat(htpasswd).st_mode & 0o777 == 0o600
    listed = _users("list", "--htpasswd", htpasswd, "--json")
    assert json.loads(listed.stdout) == {"users": ["alice", "bob"]}
    everything = listed.stdout + _users("list", "--htpasswd", htpasswd).stdout
    assert "pw-of-" not in everything and "$2" not in everything
    assert _users("remove", "bob", "--htpasswd", htpasswd).returncode == 0
    assert _users("list", "--htpasswd", htpasswd).stdout.split() == ["alice"]


def test_users_without_a_terminal_need_password_stdin(tmp_path):
    result = _users("add", "alice", "--htpasswd", str(tmp_path / "htpasswd"), stdin="")
    assert result.returncode == 1 and "--password-stdin" in result.stderr
    assert not (tmp_path / "htpasswd").exists()


def test_users_refusals_are_clear(tmp_path):
    htpasswd = str(tmp_path / "htpasswd")
    assert _users("add", "alice", "--htpasswd", htpasswd, "--password-stdin", stdin="pw\n").returncode == 0
    again = _users("add", "alice", "--htpasswd", htpasswd, "--password-stdin", stdin="other\n")
    assert again.returncode == 1 and "already exists" in again.stderr and "other" not in again.stderr
    missing = _users("passwd", "carol", "--htpasswd", htpasswd, "--password-stdin", stdin="pw\n")
    assert missing.returncode == 1 and "carol" in missing.stderr
    assert "Traceback" not in again.stderr + missing.stderr


def _render(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    user = ("--worker-user", "root") if os.geteuid() == 0 else ()
    return run_cli("nginx", "render", "--upstream", "127.0.0.1:5000", "--listen", f"127.0.0.1:{free_port()}",
                   "--state-dir", str(tmp_path / "state"), "-o", str(tmp_path / "nginx.conf"), *user, *flags)


def test_render_then_check(tmp_path):
    rendered = _render(tmp_path, "--auth", "basic+token")
    assert rendered.returncode == 0, rendered.stderr
    assert "validated with nginx -t" in rendered.stdout
    checked = run_cli("nginx", "check", str(tmp_path / "nginx.conf"))
    assert checked.returncode == 0, checked.stderr


def test_render_for_a_container(tmp_path):
    rendered = _render(tmp_path, "--auth", "token", "--container")
    assert rendered.returncode == 0, rendered.stderr
    conf = (tmp_path / "nginx.conf").read_text()
    assert "daemon off;" in conf and "access_log /dev/stdout" in conf and "error_log stderr" in conf


def test_render_refuses_an_open_door_unless_asked(tmp_path):
    refused = _render(tmp_path, "--auth", "none")
    assert refused.returncode == 1 and "--insecure-no-auth" in refused.stderr
    assert not (tmp_path / "nginx.conf").exists()
    assert _render(tmp_path, "--auth", "none", "--insecure-no-auth").returncode == 0


def test_render_refuses_what_nginx_rejects_and_keeps_the_old_file(tmp_path):
    assert _render(tmp_path, "--auth", "token").returncode == 0
    before = (tmp_path / "nginx.conf").read_text()
    broken = _render(tmp_path, "--auth", "token", "--tls-cert", str(tmp_path / "missing.pem"),
                     "--tls-key", str(tmp_path / "missing.key"))
    assert broken.returncode == 1 and "nginx rejects" in broken.stderr and "missing.pem" in broken.stderr
    assert (tmp_path / "nginx.conf").read_text() == before


def test_check_reports_a_broken_file(tmp_path):
    conf = tmp_path / "broken.conf"
    conf.write_text("events {}\nhttp { server { listen 127.0.0.1:1; location / { proxy_pass; } } }\n")
    result = run_cli("nginx", "check", str(conf))
    assert result.returncode == 1 and "nginx rejects" in result.stderr and "Traceback" not in result.stderr


def test_rotate_token_prints_the_successor_once_and_expires_the_old(tmp_path):
    store = str(tmp_path / "store")
    first = run_cli("tokens", "create", "--name", "ci", "--backend-store-uri", store).stdout.strip()
    refused = run_cli("rotate", "token", "ci", "--overlap", "0", "--json", "--backend-store-uri", store)
    assert refused.returncode == 1 and "--to" in refused.stdout + refused.stderr
    rotated = run_cli("rotate", "token", "ci", "--overlap", "0", "--backend-store-uri", store)
    assert rotated.returncode == 0, rotated.stderr
    successor = rotated.stdout.strip()
    assert successor.startswith("ryt_") and successor != first and successor not in rotated.stderr
    listed = json.loads(run_cli("tokens", "list", "--json", "--backend-store-uri", store).stdout)["tokens"]
    assert [t["name"].startswith("ci-") for t in listed] == [True]  # the old one is gone at overlap 0


def test_rotate_htpasswd_hands_the_new_password_to_a_secret_file(tmp_path):
    htpasswd, secret = str(tmp_path / "htpasswd"), tmp_path / "alice.secret"
    added = _users("add", "alice", "--htpasswd", htpasswd, "--password-stdin", stdin="old-pw\n")
    assert added.returncode == 0
    rotated = run_cli("rotate", "htpasswd", "alice", "--htpasswd", htpasswd, "--overlap", "0",
                      "--to", str(secret), "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_password = secret.read_text().strip()
    assert os.stat(secret).st_mode & 0o777 == 0o600 and new_password not in rotated.stdout
    assert users.verify(htpasswd, "alice", new_password) and not users.verify(htpasswd, "alice", "old-pw")


def test_rotations_refuse_bad_input_with_a_clear_error(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("pw")
    for args in (("db-password", str(tmp_path / "folder-store"), "--secret", str(secret)),
                 ("s3-keys", "runyard", "--secret", str(secret)),
                 ("tls", "--cert", str(tmp_path / "no.pem"), "--key", str(tmp_path / "no.key"),
                  "--installed-cert", str(tmp_path / "a.pem"), "--installed-key", str(tmp_path / "a.key"),
                  "--nginx-pid", str(tmp_path / "nginx.pid"))):
        result = run_cli("rotate", *args, env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                                               "AWS_DEFAULT_REGION": "us-east-1"})
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.splitlines()[-1].startswith("Error: "), result.stderr  # after stage lines
        assert "Traceback" not in result.stderr
        assert "pw" not in result.stderr.replace("password", "")
