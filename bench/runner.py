"""Runs every workload on every server of one backend, alternating servers workload by workload.

A server that fails to start, or a workload that fails on one server, is recorded and reported; the
other servers carry on. Servers are always stopped and databases dropped, even on error.
"""

from __future__ import annotations

import shutil
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import servers
from bench.rest import Rest
from bench.servers import ServerSpec
from bench.sizes import Sizes
from bench.workloads import WORKLOADS, Target


@dataclass
class BackendRun:
    backend: str
    columns: list[str]                                             # server names, in run order
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # server -> workload -> "error"/"down"
    notes: list[str] = field(default_factory=list)
    errors: int = 0                                                 # things that crashed (exit code)
    skipped: str | None = None

    def fail(self, server: str, workload: str, mark: str) -> None:
        self.failed.setdefault(server, {})[workload] = mark


@dataclass
class Plan:
    specs: list[ServerSpec]
    executables: dict[str, Path | None]   # kind -> console script; None = unavailable (reason in notes)
    unavailable: dict[str, str]            # kind -> why it cannot run at all
    workloads: list[str]
    sizes: Sizes
    workdir: Path                          # this run's scratch folder
    scratch: Path                          # kept between runs (the big artifact file)


def run_backend(stores, plan: Plan) -> BackendRun:
    result = BackendRun(stores.name, [s.name for s in plan.specs])
    live: list[Target] = []
    artifact_dirs: list[Path] = []
    print(f"\n=== backend {stores.name} ===", flush=True)
    try:
        for spec in plan.specs:
            target = _start(spec, stores, plan, result, artifact_dirs)
            if target:
                live.append(target)
        for workload in plan.workloads:
            signatures = {}
            for target in live:
                outcome = _run_one(workload, target, plan, result)
                if outcome is not None and outcome.signature is not None:
                    signatures[target.name] = outcome.signature
            if len({repr(s) for s in signatures.values()}) > 1:
                detail = "; ".join(f"{name}: {_describe(sig)}" for name, sig in signatures.items())
                result.notes.append(f"WARNING {workload}: servers disagree ({detail})")
                print(f"  ! {result.notes[-1]}", flush=True)
            elif len(signatures) > 1:  # say so when the cross-check passed, not only when it failed
                sig = next(iter(signatures.values()))
                what = "count and first 10 run names in order" if isinstance(sig, tuple) else "point count"
                result.notes.append(f"{workload}: {', '.join(signatures)} agree on {what} ({_describe(sig)})")
    finally:
        for target in live:
            target.rest.close()
            servers.stop(target.server)
        try:
            stores.cleanup()
        except Exception as exc:  # noqa: BLE001 - a failed DROP must not hide the results
            result.notes.append(f"cleanup of {stores.name} databases failed: {exc}")
        for d in artifact_dirs:  # up to a few hundred MB per backend; the numbers are what we keep
            shutil.rmtree(d, ignore_errors=True)
    return result


def _start(spec: ServerSpec, stores, plan: Plan, result: BackendRun, artifact_dirs: list) -> Target | None:
    why = plan.unavailable.get(spec.kind)
    if why:
        for w in plan.workloads:
            result.fail(spec.name, w, "down")
        return None
    label = f"{spec.kind}_w{spec.workers}"
    artifacts = plan.workdir / stores.name / f"artifacts-{label}"
    artifacts.mkdir(parents=True, exist_ok=True)
    artifact_dirs.append(artifacts)
    log = plan.workdir / "logs" / f"{stores.name}-{label}.log"
    try:
        uri = stores.create(label)
        port = servers.free_port()
        cmd = servers.command(spec, plan.executables[spec.kind], uri, artifacts, port)
        t0 = time.perf_counter()
        server = servers.start(spec, cmd, port, log, cwd=plan.workdir)
        print(f"  {spec.name} up on :{port} in {time.perf_counter() - t0:.1f}s (log {log})", flush=True)
    except Exception as exc:  # noqa: BLE001 - ServerStartError or anything else: report it, run the others
        result.errors += 1
        result.notes.append(f"{spec.name} did not start on {stores.name}: {str(exc).splitlines()[0]} "
                            f"(log: {log})")
        print(f"  ! {spec.name} did not start on {stores.name}:\n{exc}", flush=True)
        for w in plan.workloads:
            result.fail(spec.name, w, "down")
        return None
    rest = Rest(server.base_url)
    values = result.values.setdefault(spec.name, {})
    values["rss.start_mb"] = server.rss_mb()
    try:
        exp = rest.post("/experiments/create", {"name": f"bench-{uuid.uuid4().hex[:10]}"})
        return Target(spec.name, server, rest, exp["experiment_id"], plan.scratch)
    except Exception as exc:  # noqa: BLE001 - a server that cannot do this cannot run any workload
        result.errors += 1
        result.notes.append(f"{spec.name} on {stores.name}: cannot create an experiment: {exc}")
        print(f"  ! {result.notes[-1]}", flush=True)
        for w in plan.workloads:
            result.fail(spec.name, w, "error")
        rest.close()
        servers.stop(server)
        return None


def _run_one(workload: str, target: Target, plan: Plan, result: BackendRun):
    code = target.server.exit_code()
    if code is not None:
        result.fail(target.name, workload, "down")
        if not any(f"{target.name} exited" in n for n in result.notes):
            result.errors += 1
            result.notes.append(f"{target.name} exited with code {code} during the run "
                                f"(log: {target.server.log_path})")
        return None
    t0 = time.perf_counter()
    try:
        outcome = WORKLOADS[workload](target, plan.sizes)
    except Exception as exc:  # noqa: BLE001 - one failing workload must not stop the others
        result.errors += 1
        result.fail(target.name, workload, "error")
        first = str(exc).splitlines()[0] if str(exc) else ""
        result.notes.append(f"{target.name} failed {workload} on {result.backend}: "
                            f"{type(exc).__name__}: {first[:240]}")
        print(f"  ! {result.notes[-1]}", flush=True)
        with open(plan.workdir / "logs" / "errors.log", "a") as f:
            f.write(f"--- {result.backend} {target.name} {workload}\n{traceback.format_exc()}\n")
        return None
    result.values.setdefault(target.name, {}).update(outcome.values)
    for note in outcome.notes:
        result.notes.append(f"WARNING {note}")
        print(f"  ! {note}", flush=True)
    print(f"  {workload:<10} {target.name:<11} {_headline(workload, outcome.values)}"
          f"  [{time.perf_counter() - t0:.0f}s]", flush=True)
    return outcome


def _headline(workload: str, v: dict) -> str:
    if workload == "artifacts":
        return (f"up {v['artifacts.upload_mbps']:.0f} MB/s, down {v['artifacts.download_mbps']:.0f} MB/s, "
                f"RSS {v['rss.before_mb']:.0f} -> peak {v['rss.peak_mb']:.0f} MB")
    rate = v.get(f"{workload}.rate", 0.0)
    return (f"{rate:9.1f}/s  p50 {v.get(f'{workload}.p50_ms', 0):.2f} ms  "
            f"p99 {v.get(f'{workload}.p99_ms', 0):.2f} ms  (n={v.get(f'{workload}.count', 0):.0f})")


def _describe(signature) -> str:
    if isinstance(signature, tuple):
        count, names = signature
        return f"{count} runs, first run names {names[:3]}"
    return f"{signature:,} points"
