"""What every `runyard` command shares: where output goes, one clear error line, JSON, confirmation."""

from __future__ import annotations

import json
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from server.errors import RunyardError

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)  # soft_wrap: a message stays on one line

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for jobs).")]


def fail(message: str, error_code: str = "INVALID_STATE", as_json: bool = False,
         exit_code: int = 1) -> NoReturn:
    if as_json:
        sys.stdout.write(json.dumps({"error_code": error_code, "message": message}) + "\n")
    else:
        err.print(Text.assemble(("Error: ", "bold red"), message))
    raise typer.Exit(exit_code)


def run(operation, *args, as_json: bool = False, **kwargs):
    try:
        return operation(*args, **kwargs)
    except RunyardError as exc:
        fail(exc.message, exc.error_code, as_json)


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data) + "\n")


def confirm(question: str, yes: bool, as_json: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        fail("Refusing to go on without confirmation: pass --yes (e.g. in a job)", "INVALID_PARAMETER_VALUE",
              as_json)
    if not typer.confirm(question, default=False, err=True):
        raise typer.Exit(1)
