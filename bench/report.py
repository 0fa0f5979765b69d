"""Turns measured numbers into the side-by-side tables, the target checks and bench/RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.runner import BackendRun
from bench.sizes import Sizes


@dataclass(frozen=True)
class Measure:
    key: str
    label: str            # may use Sizes fields, e.g. {search_runs:,}
    workload: str
    better: str | None    # "higher", "lower" or None (no ratio)
    decimals: int = 1


MEASURES = [
    Measure("create_run.rate", "create run (req/s)", "create_run", "higher"),
    Measure("create_run.mean_ms", "create run mean latency (ms)", "create_run", "lower", 2),
    Measure("create_run.p50_ms", "create run p50 latency (ms)", "create_run", "lower", 2),
    Measure("create_run.p99_ms", "create run p99 latency (ms)", "create_run", "lower", 2),
    Measure("log_metric.rate", "single log-metric (req/s)", "log_metric", "higher"),
    Measure("log_metric.p50_ms", "log-metric p50 latency (ms)", "log_metric", "lower", 2),
    Measure("log_metric.p99_ms", "log-metric p99 latency (ms)", "log_metric", "lower", 2),
    Measure("log_batch.rate", "log-batch of {batch_metrics} metrics (batches/s)", "log_batch", "higher", 2),
    Measure("search.rate", "search {search_runs:,} runs, filter + metric order (searches/s)", "search",
            "higher", 2),
    Measure("history.rate", "metric history of {history_points:,} points (fetches/s)", "history",
            "higher", 2),
    Measure("artifacts.upload_mbps", "artifact upload {artifact_mb} MB (MB/s)", "artifacts", "higher"),
    Measure("artifacts.download_mbps", "artifact download {artifact_mb} MB (MB/s)", "artifacts", "higher"),
    Measure("rss.start_mb", "server RSS after start (MB)", "", "lower", 0),
    Measure("rss.before_mb", "server RSS before artifacts (MB)", "artifacts", "lower", 0),
    Measure("rss.peak_mb", "server RSS peak during artifacts (MB)", "artifacts", "lower", 0),
    Measure("rss.growth_mb", "RSS growth during artifacts (MB)", "artifacts", None, 0),
]

# Issue 2's acceptance bar, checked for each runyard column: ratio keys that must reach the minimum.
TRACKING = ["create_run.rate", "log_metric.rate", "log_batch.rate", "search.rate", "history.rate"]

LEGEND = """\
Legend: each figure is one timed loop on one server after warm-up requests (rates = completed calls /
elapsed wall time; latencies are per call, client-side, keep-alive `requests.Session`). The ratio is
runyard / the better of the MLflow columns for rates and MLflow / runyard for latency and memory, so
**> 1 always means runyard is better**. RSS = resident memory summed over the server process and all
its children (/proc), in MiB; MB/s = MiB/s. `down` = the server did not start or exited, `error` = the
workload failed on that server (see Notes), `—` = not measured. Timed loops stop at their count or
after {max_seconds:.0f} s, whichever comes first. MLflow runs with `MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`
(GenAI job consumers off; that only lowers MLflow's CPU and RSS)."""


def table(run: BackendRun, sizes: Sizes) -> str:
    runyards = [c for c in run.columns if c.startswith("runyard")]
    mlflows = [c for c in run.columns if c.startswith("mlflow")]
    ratio_heads = [f"ratio {c.split()[1]} vs best mlflow" if len(runyards) > 1 else "ratio vs best mlflow"
                   for c in runyards]
    head = ["workload", *run.columns, *ratio_heads]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in MEASURES:
        cells = [m.label.format(**vars(sizes))]
        cells += [_cell(run, c, m) for c in run.columns]
        for c in runyards:
            r = ratio(run, c, mlflows, m)
            cells.append("—" if r is None else f"**{r:.2f}×**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(run: BackendRun, column: str, m: Measure) -> str:
    value = run.values.get(column, {}).get(m.key)
    if value is not None:
        return f"{value:,.{m.decimals}f}"
    marks = run.failed.get(column, {})
    if m.workload:
        return marks.get(m.workload, "—")
    return "down" if marks and set(marks.values()) == {"down"} else "—"


def ratio(run: BackendRun, runyard: str, mlflows: list[str], m: Measure) -> float | None:
    if m.better is None:
        return None
    ours = run.values.get(runyard, {}).get(m.key)
    theirs = [run.values.get(c, {}).get(m.key) for c in mlflows]
    theirs = [v for v in theirs if v]
    if not ours or not theirs:
        return None
    if m.better == "higher":
        return ours / max(theirs)
    return min(theirs) / ours


def checks(run: BackendRun, sizes: Sizes) -> list[str]:
    """The issue's acceptance targets, one line each, for every runyard column."""
    mlflows = [c for c in run.columns if c.startswith("mlflow")]
    by_key = {m.key: m for m in MEASURES}
    out = []
    for col in (c for c in run.columns if c.startswith("runyard")):
        def verdict(ok: bool | None) -> str:
            return "n/a" if ok is None else ("met" if ok else "NOT met")

        tracking = [ratio(run, col, mlflows, by_key[k]) for k in TRACKING]
        low = min((r for r in tracking if r is not None), default=None)
        ok = None if any(r is None for r in tracking) else all(r >= 3 for r in tracking)
        out.append(f"{col}: every tracking workload ≥ 3× MLflow: {verdict(ok)}"
                   + (f" (lowest {low:.2f}×)" if low is not None else ""))
        art = [ratio(run, col, mlflows, by_key[k])
               for k in ("artifacts.upload_mbps", "artifacts.download_mbps")]
        ok = None if any(r is None for r in art) else all(r >= 1 for r in art)
        out.append(f"{col}: artifact throughput ≥ 1× MLflow: {verdict(ok)}")
        growth = run.values.get(col, {}).get("rss.growth_mb")
        ok = None if growth is None else growth < sizes.artifact_mb / 2
        out.append(f"{col}: flat memory (RSS growth < half the {sizes.artifact_mb} MB file): {verdict(ok)}"
                   + (f" (+{growth:.0f} MB)" if growth is not None else ""))
        p50 = run.values.get(col, {}).get("log_metric.p50_ms")
        ok = None if p50 is None else p50 < 2.0
        out.append(f"{col}: single log-metric p50 < 2 ms: {verdict(ok)}"
                   + (f" ({p50:.2f} ms)" if p50 is not None else ""))
    return out


def machine_facts(pg_version: str | None) -> list[tuple[str, str]]:
    facts = [
        ("nproc", f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})"),
        ("cpu", _cpu_model()),
        ("memory", _mem_total()),
        ("kernel", platform.release()),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("sqlite", sqlite3.sqlite_version),
        ("postgresql", pg_version or "not used"),
        ("runyard", _runyard_version()),
        ("mlflow (reference)", "3.17.2 in bench/.work/mlflow-venv"),
    ]
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _runyard_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("runyard")
    except PackageNotFoundError:
        v = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    dirty = ""
    if rev:
        status = subprocess.run(["git", "status", "--porcelain"], check=False, capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout
        dirty = " + uncommitted changes" if status.strip() else ""
    return f"{v} (git {rev}{dirty})" if rev else f"{v} (no git commit yet)"


def stall_notes(run: BackendRun) -> list[str]:
    """Point out the ~40-50 ms per-request floor of a server that leaves TCP_NODELAY off."""
    out = []
    for col in run.columns:
        p50 = run.values.get(col, {}).get("log_metric.p50_ms")
        if p50 is not None and 35 <= p50 <= 60:
            out.append(f"{col}: single small requests take {p50:.0f} ms at p50 — the Nagle/delayed-ACK "
                       "stall of uvicorn with more than one worker (TCP_NODELAY left off on the inherited "
                       "socket); the ratio therefore uses the better MLflow column.")
    return out


def render(runs: list[BackendRun], sizes: Sizes, command: str, started: dt.datetime, seconds: float,
           facts: list[tuple[str, str]], general_notes: list[str]) -> str:
    out = ["# Runyard vs MLflow benchmark", "",
           f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')} (took {seconds / 60:.1f} min)",
           f"- command: `{command}` (from the repository root)",
           "- sizes: " + ", ".join(f"{k}={v}" for k, v in vars(sizes).items())]
    out += [f"- {k}: {v}" for k, v in facts]
    out.append("")
    for note in general_notes:
        out.append(f"> {note}")
    if general_notes:
        out.append("")
    for run in runs:
        out.append(f"## {run.backend}")
        out.append("")
        if run.skipped:
            out += [f"Skipped: {run.skipped}", ""]
            continue
        out += [table(run, sizes), ""]
        out += ["Targets (issue 2):", ""] + [f"- {line}" for line in checks(run, sizes)] + [""]
        notes = stall_notes(run) + run.notes
        if notes:
            out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    out.append(LEGEND.format(max_seconds=sizes.max_seconds))
    out.append("")
    return "\n".join(out)
