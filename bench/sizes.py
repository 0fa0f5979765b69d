"""How much work each workload does. One place, so `--quick` and the full run differ only here."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sizes:
    create_runs: int          # timed runs/create calls
    log_metrics: int          # timed single log-metric calls
    log_batches: int          # timed log-batch calls of `batch_metrics` metrics each
    batch_metrics: int
    search_runs: int          # runs seeded into the search experiment
    searches: int             # timed runs/search calls
    history_points: int       # points logged for one metric key
    history_fetches: int      # timed full-history fetches (all pages)
    artifact_mb: int          # size of the file pushed through the artifact proxy
    artifact_repeats: int
    max_seconds: float        # cap on every timed loop: slow servers stop early, the rate stays honest
    seed_max_seconds: float   # cap on untimed seeding (a server that cannot seed in time gets an error)
    seed_threads: int         # seeding is not timed, so it uses several connections to finish sooner


FULL = Sizes(
    create_runs=2000, log_metrics=4000, log_batches=40, batch_metrics=1000,
    search_runs=5000, searches=40, history_points=100_000, history_fetches=8,
    artifact_mb=50, artifact_repeats=3,
    max_seconds=12.0, seed_max_seconds=240.0, seed_threads=6,
)

QUICK = Sizes(
    create_runs=100, log_metrics=200, log_batches=4, batch_metrics=1000,
    search_runs=300, searches=5, history_points=5000, history_fetches=3,
    artifact_mb=8, artifact_repeats=1,
    max_seconds=3.0, seed_max_seconds=60.0, seed_threads=4,
)


def pick(quick: bool, max_seconds: float | None = None) -> Sizes:
    sizes = QUICK if quick else FULL
    return replace(sizes, max_seconds=max_seconds) if max_seconds else sizes
