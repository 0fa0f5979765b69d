"""The `runyard` CLI as users run it: a subprocess of the interpreter running the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.servers import runyard_command

# Runs the CLI as a newer runyard would: same code, another migration chain (helpers.schema).
CHAIN_LAUNCHER = ("import sys, migrations.runner as r; r.SCRIPT_LOCATION = sys.argv.pop(1); "
                  "from toolkit.cli import app; app(prog_name='runyard')")


def cli_command(*args: str, chain: Path | None = None) -> list[str]:
    return [sys.executable, "-c", CHAIN_LAUNCHER, str(chain), *args] if chain else runyard_command(*args)


def clean_env(extra: dict | None = None) -> dict:
    """The test process's environment without RUNYARD_* settings, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}, **(extra or {})}


def run_cli(*args: str, env: dict | None = None, chain: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args, chain=chain), capture_output=True, text=True, timeout=timeout,
                          check=False, env=clean_env(env))
