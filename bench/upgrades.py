"""`python -m bench.upgrades`: time `runyard db backup | verify | restore | upgrade` on a database holding
10M metric rows (SQLite and PostgreSQL), next to the bare tool each one wraps, and write the table into
bench/RESULTS.md (its own section, see bench/sections.py).

MLflow ships no backup, verify or restore, and its `mlflow db upgrade` runs on another schema, so the
reference here is the bare dump each backup is built on: the SQLite backup API, `pg_dump -Fc`. The ratio
says what the manifest (checksums of every row), the SHA-256 and the atomic publish cost on top.

Examples:
    make bench                                          # runs this after the REST benchmark
    .venv/bin/python -m bench.upgrades --rows 1000000 --backends sqlite
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from bench import databases, sections
from migrations import runner
from server.store.uri import create_engine

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / ".work" / "upgrades"
LAUNCHER = ("import sys, migrations.runner as r; r.SCRIPT_LOCATION = sys.argv.pop(1); "
            "from toolkit.cli import app; app(prog_name='runyard')")
NEXT_REVISION = '''"""Benchmark revision: one new table, no data moved.

Revision ID: bench1
Revises: {head}
"""
import sqlalchemy as sa
from alembic import op

revision = "bench1"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("bench_next", sa.Column("id", sa.Integer(), primary_key=True))
'''


def _chain(folder: Path) -> Path:
    """The migration chain plus one revision: what the next runyard release would ship."""
    location = folder / "chain"
    shutil.rmtree(location, ignore_errors=True)
    shutil.copytree(runner.SCRIPT_LOCATION, location, ignore=shutil.ignore_patterns("__pycache__"))
    (location / "versions" / "bench1_next.py").write_text(NEXT_REVISION.format(head=runner.head_revision()))
    return location


def _fill(uri: str, rows: int) -> None:
    """A migrated store with one run holding `rows` metric points, generated inside the database."""
    engine = create_engine(uri, pool_size=1)
    try:
        runner.upgrade(engine)
        with engine.begin() as conn:
            quote = conn.dialect.identifier_preparer.quote
            conn.execute(sa.text("INSERT INTO experiments (name, lifecycle_stage, workspace) "
                                 "VALUES ('bench', 'active', 'default')"))
            experiment = conn.execute(sa.text("SELECT experiment_id FROM experiments")).scalar_one()
            conn.execute(sa.text("INSERT INTO runs (run_uuid, experiment_id, status, lifecycle_stage) "
                                 "VALUES ('r0', :e, 'FINISHED', 'active')"), {"e": experiment})
            columns = ", ".join(quote(c) for c in ("run_uuid", "key", "timestamp", "step", "value", "is_nan"))
            if conn.dialect.name == "postgresql":
                series, false = "generate_series(1, :n) AS s(n)", "false"
            else:
                series = "(WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < :n) " \
                         "SELECT n FROM s)"
                false = "0"
            for key in ("loss", "accuracy"):
                conn.execute(sa.text(f"INSERT INTO metrics ({columns}) SELECT 'r0', '{key}', "
                                     f"1700000000000 + n, n, n * 0.0001, {false} FROM {series}"),
                             {"n": rows // 2})
    finally:
        engine.dispose()


def _timed(command: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}… failed: {done.stderr.strip()[-500:]}")
    return seconds, json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}


def _cli(*args: str, chain: Path | None = None) -> list[str]:
    if chain is not None:
        return [sys.executable, "-c", LAUNCHER, str(chain), *args]
    return [sys.executable, "-m", "toolkit.cli", *args]


def _bare_dump(backend: str, uri: str, target: Path) -> float:
    started = time.perf_counter()
    if backend == "sqlite":
        source = sqlite3.connect(sa.make_url(uri).database)
        copy = sqlite3.connect(target)
        source.backup(copy)
        source.close()
        copy.close()
    else:
        database = sa.make_url(uri).database
        subprocess.run(["pg_dump", "-Fc", "-h", "127.0.0.1", "-U", "postgres", "-f", str(target), database],
                       check=True)
    return time.perf_counter() - started


def measure(backend: str, rows: int, folder: Path) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stores = databases.SqliteStores(folder) if backend == "sqlite" else databases.PostgresStores()
    try:
        uri = stores.create("upgrade source")
        print(f"[{backend}] filling {rows:,} metric rows…", flush=True)
        started = time.perf_counter()
        _fill(uri, rows)
        fill_s = time.perf_counter() - started
        backups = folder / "backups"
        result = {"rows": rows, "fill_s": fill_s}
        print(f"[{backend}] bare dump…", flush=True)
        result["bare_s"] = _bare_dump(backend, uri, folder / "bare.dump")
        result["bare_bytes"] = (folder / "bare.dump").stat().st_size
        print(f"[{backend}] runyard db backup…", flush=True)
        result["backup_s"], made = _timed(_cli("db", "backup", uri, "--to", str(backups), "--json"))
        result["backup_bytes"] = made["size_bytes"]
        print(f"[{backend}] runyard db verify…", flush=True)
        result["verify_s"], _ = _timed(_cli("db", "verify", made["backup"], "--using", uri, "--json"))
        print(f"[{backend}] runyard db restore…", flush=True)
        result["restore_s"], _ = _timed(_cli("db", "restore", uri, "--from", made["backup"], "--yes",
                                             "--json"))
        print(f"[{backend}] runyard db upgrade (backup, verify, migrate, check)…", flush=True)
        chain = _chain(folder)
        result["upgrade_s"], upgraded = _timed(_cli("db", "upgrade", uri, "--yes", "--json", "--backup-to",
                                                    str(backups), chain=chain))
        assert upgraded["upgraded"] and upgraded["revision"] == "bench1", upgraded
        return result
    finally:
        stores.cleanup()


def render(results: dict[str, dict], started: dt.datetime, command: str) -> str:
    lines = ["## Safe upgrades: backup, verify, restore, upgrade", "",
             f"`{command}` on {started:%Y-%m-%d %H:%M} UTC. Each command is the CLI as an operator runs it "
             "(a fresh process, `--json`), timed end to end. *bare dump* is the tool the backup wraps "
             "(SQLite backup API / `pg_dump -Fc`), without manifest, checksums, SHA-256 or publish; the "
             "ratio is runyard's backup time over it. `upgrade` is the whole safe path: lock, backup, "
             "verify (restore into a scratch database and compare every table's checksum), migrate one "
             "revision, check row counts.", "",
             "| backend | metric rows | bare dump | db backup | ratio | db verify | db restore | db upgrade "
             "| backup size |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, r in results.items():
        lines.append(f"| {backend} | {r['rows']:,} | {r['bare_s']:.1f} s | {r['backup_s']:.1f} s | "
                     f"{r['backup_s'] / r['bare_s']:.2f}× | {r['verify_s']:.1f} s | {r['restore_s']:.1f} s | "
                     f"{r['upgrade_s']:.1f} s | {r['backup_bytes'] / 2**20:,.0f} MiB "
                     f"(bare {r['bare_bytes'] / 2**20:,.0f} MiB) |")
    lines += ["", "Filling the database (INSERT … SELECT inside it) took "
              + ", ".join(f"{b} {r['fill_s']:.0f} s" for b, r in results.items()) + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upgrades", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="metric rows (default 10M)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    results = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend == "postgresql" and (problem := databases.postgres_problem()):
            print(f"postgresql skipped: {problem}")
            continue
        results[backend] = measure(backend, args.rows, WORK / backend)
        print(json.dumps({backend: results[backend]}), flush=True)
    command = "python -m bench.upgrades" + (" " + " ".join(argv) if argv else "")
    sections.write_section(args.results, "upgrades", render(results, started, command))
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
