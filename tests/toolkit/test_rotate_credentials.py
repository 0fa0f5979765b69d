"""`runyard rotate token|htpasswd` (toolkit/rotation/credentials.py) against real `runyard server`s behind
a real NGINX: under steady load from 4 client threads that re-read the credential from the secret when
they get a 401, a rotation fails no request; afterwards the old credential is refused; a verification
that fails puts everything back; no token or password ever appears in a report or an error message."""

from __future__ import annotations

import json
import time

import pytest
import requests
from helpers.ports import wait_for
from helpers.rotation import API, Load, basic, bearer, start_gateway

from server.errors import RunyardError
from server.passwords import PasswordFile
from toolkit import htpasswd, tokens
from toolkit.rotation import credentials
from toolkit.rotation.credentials import rotate_password, rotate_token

OVERLAP_S = 2
USER, PASSWORD = "alice", "the old password of alice"


@pytest.fixture(autouse=True)
def _fast_bcrypt(monkeypatch):
    monkeypatch.setattr(htpasswd, "BCRYPT_ROUNDS", 4)  # the servers check any cost; tests stay fast


@pytest.fixture(autouse=True)
def _no_client_settings(monkeypatch):
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS",
                 "MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        monkeypatch.delenv(name, raising=False)


class Recorder:
    """A progress object as the CLI's: stages, and the overlap's countdown."""

    def __init__(self):
        self.stages: list[str] = []
        self.ticks: list[float] = []
        self.total: float | None = None

    def stage(self, text: str) -> None:
        self.stages.append(text)

    def countdown(self, total_s: float):
        self.total = total_s
        return self.ticks.append


def _experiment(server) -> str:
    answer = requests.post(f"{server.url}{API}/experiments/create", json={"name": "rotation"}, timeout=30)
    answer.raise_for_status()
    return answer.json()["experiment_id"]


def _status(url: str, auth) -> int:
    return requests.get(f"{url}{API}/experiments/search", params={"max_results": 1}, auth=auth,
                        timeout=30).status_code


def _assert_secret_free(value, *secrets: str) -> None:
    text = value if isinstance(value, str) else json.dumps(value)
    for secret in secrets:
        assert secret not in text


# --- tokens --------------------------------------------------------------------------------------------

@pytest.fixture
def token_gateway(server_factory, tmp_path):
    pepper = tmp_path / "pepper"
    pepper.write_text("a pepper for the tests\n")
    server = server_factory(None, "--token-pepper-file", str(pepper), "--trusted-proxies", "127.0.0.1")
    gw = start_gateway(tmp_path, server, auth="token")
    yield gw, str(pepper)
    gw.nginx.stop()


@pytest.mark.parametrize("overlap", [0, OVERLAP_S])
def test_token_rotation_under_load_fails_no_request(token_gateway, tmp_path, overlap):
    gw, pepper = token_gateway
    uri = gw.server.backend_uri
    old_token, _ = tokens.create(uri, "ci-pipeline", "robot", "90d", pepper)
    secret = tmp_path / "token"
    secret.write_text(old_token + "\n")
    load = Load(gw.url, _experiment(gw.server), bearer, secret).start()
    load.wait_for_requests(20)

    progress = Recorder()
    report = rotate_token(uri, "ci-pipeline", overlap, to=str(secret), pepper_file=pepper, check_url=gw.url,
                          progress=progress)

    new_token = secret.read_text().strip()
    assert new_token.startswith("ryt_") and new_token != old_token
    _assert_secret_free(report, old_token, new_token)
    _assert_secret_free(progress.stages, old_token, new_token)
    assert "token" not in report
    assert report["name"] == "ci-pipeline" and report["user"] == "robot"
    assert report["successor"].startswith("ci-pipeline-") and credentials.base_name(report["successor"]) == \
        "ci-pipeline"
    assert report["verified"] == ["store", "check_url", "secret"]
    assert report["old_revoked"] is (overlap == 0)
    assert report["expires_time"] - report["created_time"] == 90 * 86_400_000  # the old token's lifetime

    # The old token stops working (at once, or once the overlap is over); the new one works.
    assert wait_for(lambda: _status(gw.url, bearer(old_token)) == 401, timeout=overlap + 30)
    assert _status(gw.url, bearer(new_token)) == 200
    load.wait_for_requests(20)  # every client has moved over and goes on
    tally = load.stop()
    assert tally.failures == []
    assert [t.reauths for t in load.tallies] == [1, 1, 1, 1]  # one 401 each, then the new token
    assert all(t.credential == new_token for t in load.tallies)
    load.check_history(gw.server)

    listing = {t["name"]: t for t in tokens.list_tokens(uri, pepper)}
    assert listing[report["successor"]]["status"] == "active"
    assert listing[report["successor"]]["user"] == "robot"
    if overlap:
        assert listing["ci-pipeline"]["status"] == "expired"
    else:
        assert "ci-pipeline" not in listing
    print(f"\ntoken rotation, overlap {overlap} s: {tally.ok} requests ok, {tally.reauths} re-read the "
          f"token after a 401, {tally.reconnects} reconnects, {len(tally.failures)} failed")


def test_token_verification_failure_rolls_back(token_gateway, tmp_path):
    gw, pepper = token_gateway
    uri = gw.server.backend_uri
    old_token, _ = tokens.create(uri, "ci-pipeline", "robot", None, pepper)
    secret = tmp_path / "token"
    secret.write_text(old_token + "\n")
    other_pepper = tmp_path / "other-pepper"
    other_pepper.write_text("not the pepper the server uses\n")

    # The toolkit's store accepts the successor, but the server (another pepper) refuses it.
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, "ci-pipeline", 60, to=str(secret), pepper_file=str(other_pepper), check_url=gw.url)
    message = raised.value.message
    assert "HTTP 401" in message and "token-pepper-file" in message and "Rolled back" in message
    assert f"{secret} holds its previous value again" not in message  # it was never written
    _assert_secret_free(message, old_token)

    listing = tokens.list_tokens(uri, pepper)
    assert [(t["name"], t["expires_time"], t["status"]) for t in listing] == [("ci-pipeline", None, "active")]
    assert secret.read_text().strip() == old_token
    assert _status(gw.url, bearer(old_token)) == 200

    # Nothing listens there: the same rollback.
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, "ci-pipeline", 60, to=str(secret), pepper_file=pepper,
                     check_url=gw.url.replace("localhost", "127.0.0.1").rsplit(":", 1)[0] + ":9")
    assert "connection refused" in raised.value.message and "revoked" in raised.value.message
    assert [t["name"] for t in tokens.list_tokens(uri, pepper)] == ["ci-pipeline"]
    assert secret.read_text().strip() == old_token


def test_token_secret_that_cannot_be_written_rolls_back(tmp_path):
    uri = str(tmp_path / "store")
    old_token, _ = tokens.create(uri, "nightly", "ci", None, None)
    unwritable = tmp_path / "no-such-folder" / "token"
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, "nightly", 0, to=str(unwritable))
    assert "Rolled back" in raised.value.message and "nightly is untouched" in raised.value.message
    assert [t["name"] for t in tokens.list_tokens(uri, None)] == ["nightly"]
    assert not unwritable.exists()


def test_token_names_follow_the_family(tmp_path):
    uri = str(tmp_path / "store")
    tokens.create(uri, "deploy", "ci", "1d", None)

    first = rotate_token(uri, "deploy", 3600)
    token = first.pop("token")  # without `to`, the CLI prints it once
    assert token.startswith("ryt_")
    _assert_secret_free(first, token)
    assert first["successor"].startswith("deploy-") and first["expires_time"] - first["created_time"] == \
        86_400_000
    assert first["old_expires_time"] <= time.time() * 1000 + 3600_000

    # The base name designates the newest active member; so does that member's own name.
    second = rotate_token(uri, "deploy", 3600)
    assert second["name"] == first["successor"] and second["successor"] != first["successor"]
    third = rotate_token(uri, second["successor"], 0, expires="2h")
    assert third["name"] == second["successor"] and third["old_revoked"] is True
    assert third["expires_time"] - third["created_time"] == 7_200_000
    assert credentials.base_name(third["successor"]) == "deploy"

    # An older member named explicitly would fork the family: refused, naming the newest.
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, first["successor"], 0)
    assert third["successor"] in raised.value.message
    with pytest.raises(RunyardError) as raised:
        rotate_token(uri, "unknown", 0)
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"

    # An overlap never lengthens a token's life.
    tokens.create(uri, "short", "ci", "1h", None)
    report = rotate_token(uri, "short", 86_400, expires="1d")
    short = next(t for t in tokens.list_tokens(uri, None) if t["name"] == "short")
    assert report["old_expires_time"] == short["expires_time"] <= short["created_time"] + 3_600_000


@pytest.mark.parametrize("overlap", [-1, float("nan"), "10m", True])
def test_bad_overlap_is_refused_before_anything_changes(tmp_path, overlap):
    uri = str(tmp_path / "store")
    tokens.create(uri, "ci", None, None, None)
    with pytest.raises(RunyardError):
        rotate_token(uri, "ci", overlap)
    assert [t["name"] for t in tokens.list_tokens(uri, None)] == ["ci"]


def test_parse_overlap():
    assert credentials.parse_overlap("0") == 0
    assert credentials.parse_overlap("90s") == 90
    assert credentials.parse_overlap("10m") == 600
    assert credentials.parse_overlap("1h") == 3600
    assert credentials.parse_overlap("2d") == 172_800
    for bad in ("", "-1m", "1y", "m"):
        with pytest.raises(RunyardError):
            credentials.parse_overlap(bad)


# --- htpasswd ------------------------------------------------------------------------------------------

@pytest.fixture
def basic_gateway(server_factory, tmp_path):
    path = tmp_path / "htpasswd"
    htpasswd.add_user(path, USER, PASSWORD)
    htpasswd.add_user(path, "bob", "the password of bob")
    server = server_factory(None, "--htpasswd", str(path), "--trusted-proxies", "127.0.0.1")
    gw = start_gateway(tmp_path, server, auth="basic")
    yield gw, path
    gw.nginx.stop()


def test_password_rotation_under_load_fails_no_request(basic_gateway, tmp_path):
    gw, path = basic_gateway
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    bob_line = next(line for line in path.read_bytes().splitlines() if line.startswith(b"bob:"))
    load = Load(gw.url, _experiment(gw.server), basic(USER), secret).start()
    load.wait_for_requests(20)

    progress = Recorder()
    report = rotate_password(str(path), USER, OVERLAP_S, to=str(secret), check_url=gw.url, progress=progress)

    new_password = secret.read_text().strip()
    assert new_password != PASSWORD and len(new_password) >= 32
    _assert_secret_free(report, PASSWORD, new_password)
    _assert_secret_free(progress.stages, PASSWORD, new_password)
    assert "password" not in report
    assert report["removed_lines"] == 1 and report["generated"] is True
    assert report["verified"] == ["htpasswd", "check_url", "secret", "check_url after removal"]
    assert progress.total == OVERLAP_S and progress.ticks == sorted(progress.ticks)
    assert progress.ticks[-1] == OVERLAP_S

    # After the overlap only the new password works; the other user is untouched, byte for byte.
    assert _status(gw.url, (USER, PASSWORD)) == 401
    assert _status(gw.url, (USER, new_password)) == 200
    assert [line.split(b":")[0] for line in path.read_bytes().splitlines()] == [b"alice", b"bob"]
    assert bob_line in path.read_bytes().splitlines()
    load.wait_for_requests(20)
    tally = load.stop()
    assert tally.failures == []
    assert [t.reauths for t in load.tallies] == [1, 1, 1, 1]
    assert all(t.credential == new_password for t in load.tallies)
    load.check_history(gw.server)
    print(f"\npassword rotation, overlap {OVERLAP_S} s: {tally.ok} requests ok, {tally.reauths} re-read the "
          f"password after a 401, {tally.reconnects} reconnects, {len(tally.failures)} failed")


def test_both_passwords_work_during_the_overlap(basic_gateway, tmp_path):
    gw, path = basic_gateway
    secret = tmp_path / "password"
    seen = {}

    class During(Recorder):
        def countdown(self, total_s):
            seen["old"] = _status(gw.url, (USER, PASSWORD))
            seen["new"] = _status(gw.url, (USER, secret.read_text()))
            seen["lines"] = len(htpasswd.password_hashes(path, USER))
            return None

    rotate_password(str(path), USER, 1, to=str(secret), password="a chosen new password", progress=During())
    assert seen == {"old": 200, "new": 200, "lines": 2}
    assert secret.read_text() == "a chosen new password"
    assert _status(gw.url, (USER, PASSWORD)) == 401
    assert _status(gw.url, (USER, "a chosen new password")) == 200


def test_password_verification_failure_rolls_back(server_factory, tmp_path):
    # The servers check another htpasswd file than the one rotated: NGINX refuses the new password.
    served, rotated = tmp_path / "served-htpasswd", tmp_path / "htpasswd"
    htpasswd.add_user(served, USER, PASSWORD)
    htpasswd.add_user(rotated, USER, PASSWORD)
    server = server_factory(None, "--htpasswd", str(served), "--trusted-proxies", "127.0.0.1")
    gw = start_gateway(tmp_path, server, auth="basic")
    try:
        secret = tmp_path / "password"
        secret.write_text(PASSWORD + "\n")
        before = rotated.read_bytes()
        with pytest.raises(RunyardError) as raised:
            rotate_password(str(rotated), USER, OVERLAP_S, to=str(secret), check_url=gw.url)
        message = raised.value.message
        assert "HTTP 401" in message and f"--htpasswd {rotated}" in message
        assert "the new line of alice was removed" in message
        _assert_secret_free(message, PASSWORD)
        assert rotated.read_bytes() == before
        assert secret.read_text().strip() == PASSWORD
        assert _status(gw.url, (USER, PASSWORD)) == 200

        # A given password that could never be used: refused before anything changes.
        for bad in ("two\nlines", "x" * 73, ""):
            with pytest.raises(RunyardError) as raised:
                rotate_password(str(rotated), USER, 0, to=str(secret), password=bad)
            _assert_secret_free(raised.value.message, bad or "\0")
        assert rotated.read_bytes() == before
        with pytest.raises(RunyardError) as raised:
            rotate_password(str(rotated), "nobody", 0)
        assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    finally:
        gw.nginx.stop()


def test_password_secret_written_back_when_a_later_step_fails(tmp_path, monkeypatch):
    path = tmp_path / "htpasswd"
    htpasswd.add_user(path, USER, PASSWORD)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD)
    before = path.read_bytes()
    real_open = credentials.open_secret

    class Garbling:
        """Stores something else than it is given the first time: the read-back catches it."""

        def __init__(self, ref):
            self.inner = real_open(ref)
            self.ref = self.inner.ref
            self.writes = 0

        def read(self):
            return self.inner.read()

        def write(self, value):
            self.writes += 1
            self.inner.write(value[::-1] if self.writes == 1 else value)

    monkeypatch.setattr(credentials, "open_secret", Garbling)
    with pytest.raises(RunyardError) as raised:
        rotate_password(str(path), USER, 0, to=str(secret))
    assert "read back" in raised.value.message and "holds its previous value again" in raised.value.message
    assert secret.read_text() == PASSWORD
    assert path.read_bytes() == before


def test_generated_password_is_returned_only_without_a_secret(tmp_path):
    path = tmp_path / "htpasswd"
    htpasswd.add_user(path, USER, PASSWORD)
    report = rotate_password(str(path), USER, 0)
    password = report.pop("password")
    assert htpasswd.verify(path, USER, password) and not htpasswd.verify(path, USER, PASSWORD)
    _assert_secret_free(report, password)
    report = rotate_password(str(path), USER, 0, password="given on stdin")
    assert "password" not in report


# --- the htpasswd primitives and the server's check ----------------------------------------------------

def test_a_user_may_have_several_lines_and_any_one_lets_in(tmp_path):
    path = tmp_path / "htpasswd"
    htpasswd.add_user(path, USER, "first")
    htpasswd.add_user(path, "bob", "bobs")
    [first_hash] = htpasswd.password_hashes(path, USER)
    second_hash = htpasswd.add_password(path, USER, "second")
    assert htpasswd.password_hashes(path, USER) == [first_hash, second_hash]
    # the new line sits right after the user's last one
    assert [line.split(b":")[0] for line in path.read_bytes().splitlines()] == [b"alice", b"alice", b"bob"]

    checker = PasswordFile(str(path))
    for password in ("first", "second"):
        assert htpasswd.verify(path, USER, password)
        assert checker.verify(USER, password)
    assert not checker.verify(USER, "third") and not htpasswd.verify(path, USER, "third")
    assert checker.verify("bob", "bobs")

    assert htpasswd.remove_hashes(path, USER, [first_hash]) == 1
    assert not checker.verify(USER, "first")  # the file changed: forgotten at once
    assert checker.verify(USER, "second")
    with pytest.raises(RunyardError) as raised:
        htpasswd.remove_hashes(path, USER, [second_hash])  # never the last line: that is `users remove`
    assert raised.value.error_code == "INVALID_STATE"
    htpasswd.add_hashes(path, USER, [first_hash])
    assert checker.verify(USER, "first") and checker.verify(USER, "second")
    with pytest.raises(RunyardError):
        htpasswd.add_password(path, "nobody", "pw")
    with pytest.raises(RunyardError):
        htpasswd.add_hashes(path, USER, ["two\nlines"])

    # Lines of other formats (which the server ignores) are found and removed exactly, whatever bytes
    # they hold: a rotation replaces them with a bcrypt line.
    path.write_bytes(b"alice:{PLAIN}caf\xe9:x\nbob:{SHA}abc\n")
    [legacy] = htpasswd.password_hashes(path, USER)
    htpasswd.add_password(path, USER, "modern")
    assert htpasswd.remove_hashes(path, USER, [legacy]) == 1
    htpasswd.add_hashes(path, USER, [legacy])
    assert path.read_bytes().endswith(b"alice:{PLAIN}caf\xe9:x\nbob:{SHA}abc\n")
