"""Side-by-side benchmark: the same REST workloads against `runyard server` and the reference `mlflow server`.

Run it with `make bench` (or `.venv/bin/python -m bench --help`). Results go to bench/RESULTS.md.
"""
