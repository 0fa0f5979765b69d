"""`python -m bench.stores`: artifact upload/download throughput and server memory per artifact store,
runyard next to `mlflow server` on the same destination (where MLflow can use that store here), written
into bench/RESULTS.md (section "stores").

Each store is the real or emulated server the tests use (tests/helpers/stores). Every transfer goes
through the server's artifact proxy (`/api/2.0/mlflow-artifacts/artifacts/…`), as the stock client's
does: many 1 MiB files one after another, then one large file streamed both ways, while a sampler reads
the server's resident memory (its whole process tree) every 100 ms.

Examples:
    make bench                                            # runs this after the REST benchmark
    .venv/bin/python -m bench.stores --stores s3,local --large-mb 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import threading
import time
import uuid
from pathlib import Path

import requests

from bench import mlflow_env, sections
from bench.servers import ServerSpec, free_port, start, stop

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / ".work" / "stores"
sys.path.insert(0, str(REPO / "tests"))  # the store servers the tests start (helpers.stores)

from helpers.stores import STORES, running  # noqa: E402

# MLflow's own stores for these schemes import what its venv has (bench/mlflow_env.py); its HDFS store
# needs libhdfs and a JVM, and its SFTP store pysftp with the user's known_hosts: not measured.
MLFLOW_SUPPORTS = {"local", "s3", "azure", "gcs", "ftp"}
MIB = 2**20
BLOCK = bytes(range(256)) * 4096  # 1 MiB


class PeakMemory:
    """Samples a server's memory in a thread; `peak_mb` is the highest reading."""

    def __init__(self, server):
        self.server, self.peak_mb, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_mb = max(self.peak_mb, self.server.rss_mb())


def _transfers(base: str, small_count: int, large_mb: int, server) -> dict:
    url = f"{base}/api/2.0/mlflow-artifacts/artifacts/bench-{uuid.uuid4().hex[:6]}"
    session = requests.Session()
    result = {"idle_mb": server.rss_mb()}
    started = time.perf_counter()
    for i in range(small_count):
        session.put(f"{url}/small/{i}.bin", data=BLOCK, timeout=120).raise_for_status()
    result["small_up_mbs"] = small_count / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(small_count):
        response = session.get(f"{url}/small/{i}.bin", timeout=120)
        response.raise_for_status()
        assert len(response.content) == MIB
    result["small_down_mbs"] = small_count / (time.perf_counter() - started)

    def body():
        for _ in range(large_mb):
            yield BLOCK

    with PeakMemory(server) as memory:
        started = time.perf_counter()
        session.put(f"{url}/large.bin", data=body(), timeout=3600).raise_for_status()
        result["large_up_mbs"] = large_mb / (time.perf_counter() - started)
        started, received = time.perf_counter(), 0
        with session.get(f"{url}/large.bin", stream=True, timeout=3600) as response:
            response.raise_for_status()
            for chunk in response.iter_content(MIB):
                received += len(chunk)
        result["large_down_mbs"] = large_mb / (time.perf_counter() - started)
        assert received == large_mb * MIB, received
    result["peak_mb"] = memory.peak_mb
    return result


def measure(store_name: str, kinds: list[str], small_count: int, large_mb: int) -> dict[str, dict | str]:
    results: dict[str, dict | str] = {}
    with running(store_name, WORK / store_name) as store:
        for kind in kinds:
            if kind == "mlflow" and store_name not in MLFLOW_SUPPORTS:
                results[kind] = "n/a"
                continue
            exe = (mlflow_env.ensure(BENCH_DIR / ".work" / "mlflow-venv") if kind == "mlflow"
                   else Path(sys.executable).parent / "runyard")
            port, folder = free_port(), WORK / store_name / kind
            folder.mkdir(parents=True, exist_ok=True)
            command = [str(exe), "server", "--backend-store-uri", f"sqlite:///{folder / 'store.db'}",
                       "--artifacts-destination", store.root(f"{kind}-{uuid.uuid4().hex[:6]}"),
                       "--host", "127.0.0.1", "--port", str(port)]
            spec = ServerSpec(kind, 1)
            print(f"[{store_name}] {spec.name}…", flush=True)
            server = start(spec, command, port, folder / "server.log", folder, extra_env=store.env)
            try:
                results[kind] = _transfers(server.base_url, small_count, large_mb, server)
            except (requests.RequestException, AssertionError) as exc:
                results[kind] = f"failed: {str(exc)[:120]}"
            finally:
                stop(server)
    return results


def render(all_results: dict, started: dt.datetime, command: str, small_count: int, large_mb: int) -> str:
    lines = ["## Artifact stores: throughput and server memory", "",
             f"`{command}` on {started:%Y-%m-%d %H:%M} UTC, one worker each, through the artifact proxy. "
             f"*small*: {small_count} files of 1 MiB one after another (MiB/s); *large*: one {large_mb} MiB "
             "file streamed up, then down (MiB/s); *peak RSS*: the server's process tree during the large "
             "transfers (idle in brackets). MLflow cannot use HDFS here (libhdfs, JVM) nor SFTP without "
             "the user's known_hosts: n/a.", "",
             "| store | server | small up | small down | large up | large down | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for store_name, per_kind in all_results.items():
        for kind, r in per_kind.items():
            if isinstance(r, str):
                lines.append(f"| {store_name} | {kind} | {r} | | | | |")
                continue
            lines.append(f"| {store_name} | {kind} | {r['small_up_mbs']:.0f} | {r['small_down_mbs']:.0f} | "
                         f"{r['large_up_mbs']:.0f} | {r['large_down_mbs']:.0f} | "
                         f"{r['peak_mb']:.0f} MB ({r['idle_mb']:.0f}) |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument("--servers", default="runyard,mlflow")
    parser.add_argument("--small-count", type=int, default=50)
    parser.add_argument("--large-mb", type=int, default=1024)
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    all_results = {}
    for store_name in [s.strip() for s in args.stores.split(",") if s.strip()]:
        try:
            all_results[store_name] = measure(store_name, kinds, args.small_count, args.large_mb)
        except Exception as exc:  # noqa: BLE001 - a store that cannot start is reported, the rest go on
            all_results[store_name] = {kind: f"store did not start: {str(exc)[:100]}" for kind in kinds}
        print(store_name, all_results[store_name], flush=True)
    command = "python -m bench.stores" + (" " + " ".join(argv) if argv else "")
    text = render(all_results, started, command, args.small_count, args.large_mb)
    sections.write_section(args.results, "stores", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
