"""`python -m bench`: run the side-by-side benchmark and write the results table.

Examples:
    make bench                                   # full run, SQLite and PostgreSQL, writes bench/RESULTS.md
    make bench BENCH_ARGS=--quick                # smoke run with small counts
    .venv/bin/python -m bench --only mlflow --backends sqlite
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

from bench import databases, mlflow_env, report, sections
from bench.runner import BackendRun, Plan, run_backend
from bench.servers import ServerSpec
from bench.sizes import pick
from bench.workloads import WORKLOADS

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run with small counts (about 2 minutes)")
    p.add_argument("--backends", default="sqlite,postgresql", help="comma list of sqlite,postgresql")
    p.add_argument("--only", choices=["runyard", "mlflow"], help="measure only one of the two servers")
    p.add_argument("--runyard-workers", type=int_list, default=[1, 2], metavar="N[,N]",
                   help="runyard --workers values, one column each (default 1,2: w2 shows that "
                        "several workers do not stall on keep-alive connections)")
    p.add_argument("--mlflow-workers", type=int_list, default=[1, 2], metavar="N[,N]",
                   help="mlflow --workers values, one column each (default 1,2)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma list, subset of {','.join(WORKLOADS)}")
    p.add_argument("--max-seconds", type=float, help="cap on each timed loop (default 12, quick 3)")
    p.add_argument("--results", type=Path,
                   help="where to write the table (default bench/RESULTS.md; bench/.work/RESULTS-quick.md "
                        "with --quick, so a smoke run never overwrites the real figures)")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = set(args.backends) - {"sqlite", "postgresql"}
    if bad:
        p.error(f"unknown backend(s): {', '.join(sorted(bad))}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = set(args.workloads) - set(WORKLOADS)
    if bad:
        p.error(f"unknown workload(s): {', '.join(sorted(bad))}")
    return args


def server_specs(args) -> list[ServerSpec]:
    specs = []
    if args.only != "mlflow":
        specs += [ServerSpec("runyard", n) for n in args.runyard_workers]
    if args.only != "runyard":
        specs += [ServerSpec("mlflow", n) for n in args.mlflow_workers]
    return specs


def executables(specs: list[ServerSpec]) -> tuple[dict, dict, list[str]]:
    exes, unavailable, notes = {}, {}, []
    kinds = {s.kind for s in specs}
    if "runyard" in kinds:
        # the console script of the venv running us (make bench: <repo>/.venv), else the repo default
        exe = Path(sys.executable).parent / "runyard"
        exes["runyard"] = exe if exe.exists() else REPO / ".venv" / "bin" / "runyard"
        if not exes["runyard"].exists():
            unavailable["runyard"] = f"no console script at {exes['runyard']} (pip install -e . first)"
    if "mlflow" in kinds:
        try:
            exes["mlflow"] = mlflow_env.ensure(WORK / "mlflow-venv")
        except Exception as exc:  # noqa: BLE001 - no PyPI, disk full...: still measure runyard
            unavailable["mlflow"] = f"cannot create the reference MLflow venv: {exc}"
    for kind, why in unavailable.items():
        notes.append(f"{kind} not measured: {why}")
        print(f"! {notes[-1]}", flush=True)
    return exes, unavailable, notes


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A plain `kill` of the bench must still stop the servers and drop the databases: turn SIGTERM
    # into SystemExit so every `finally` runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = pick(args.quick, args.max_seconds)
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    command = "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(argv))}" if argv else "")

    workdir = WORK / "last-run"  # one scratch folder, replaced by every run: nothing piles up
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)

    specs = server_specs(args)
    exes, unavailable, general_notes = executables(specs)
    plan = Plan(specs, exes, unavailable, args.workloads, sizes, workdir, WORK)

    runs: list[BackendRun] = []
    pg_version = None
    for backend in args.backends:
        if backend == "sqlite":
            stores = databases.SqliteStores(workdir)
        else:
            problem = databases.postgres_problem()
            if problem:
                print(f"\n=== backend postgresql skipped: {problem}", flush=True)
                runs.append(BackendRun("postgresql", [s.name for s in specs], skipped=problem))
                continue
            stores = databases.PostgresStores()
            pg_version = stores.version()
        runs.append(run_backend(stores, plan))

    elapsed = time.perf_counter() - t0
    facts = report.machine_facts(pg_version)
    text = report.render(runs, sizes, command, started, elapsed, facts, general_notes)
    results = args.results or (WORK / "RESULTS-quick.md" if args.quick else BENCH_DIR / "RESULTS.md")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(sections.keep_sections(results.read_text() if results.exists() else "", text))

    for run in runs:
        print(f"\n## {run.backend}")
        if run.skipped:
            print(f"skipped: {run.skipped}")
            continue
        print(report.table(run, sizes))
        for line in report.checks(run, sizes):
            print(f"  {line}")
    print(f"\nwrote {results} ({elapsed / 60:.1f} min; server logs in {workdir / 'logs'})")
    crashed = sum(r.errors for r in runs) + len(unavailable)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
