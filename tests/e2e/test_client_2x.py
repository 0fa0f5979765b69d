"""Older clients keep working: the newest MLflow 2.x client (`mlflow-skinny`) runs a training-style script
against a real `runyard server`.

The 2.x client lives in a virtual environment of its own, created once and cached under
`~/.cache/runyard-tests/mlflow2-venv` (override with RUNYARD_MLFLOW2_VENV); it is reused while its marker
names the same requirement. The test skips only when pip cannot reach a package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REQUIREMENT = "mlflow-skinny==2.22.5"  # newest 2.x on the index (`pip index versions mlflow-skinny`)
MARKER = ".runyard-ready"
INSTALL_TIMEOUT_S = 1200
SCRIPT_TIMEOUT_S = 600
OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Max retries exceeded",
    "ProxyError",
    "ConnectTimeoutError",
    "Could not fetch URL",
    "No matching distribution found",
)


def venv_dir() -> Path:
    configured = os.environ.get("RUNYARD_MLFLOW2_VENV")
    return Path(configured) if configured else Path.home() / ".cache" / "runyard-tests" / "mlflow2-venv"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_mlflow2_python() -> Path:
    venv = venv_dir()
    marker = venv / MARKER
    if marker.is_file() and marker.read_text().strip() == REQUIREMENT and _python(venv).exists():
        return _python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
    try:
        result = subprocess.run(
            [
                str(_python(building)),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                REQUIREMENT,
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        shutil.rmtree(building, ignore_errors=True)
        pytest.skip(
            f"pip could not install {REQUIREMENT} within {INSTALL_TIMEOUT_S} s (package index unreachable?)"
        )
    if result.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        output = result.stdout + result.stderr
        if any(sign in output for sign in OFFLINE_SIGNS):
            pytest.skip(
                f"pip cannot reach a package index to install {REQUIREMENT}: "
                f"{output.strip().splitlines()[-1]}"
            )
        pytest.fail(f"pip install {REQUIREMENT} failed:\n{output[-3000:]}")
    (building / MARKER).write_text(REQUIREMENT + "\n")
    # publish atomically; if another process won the race, use theirs
    try:
        shutil.rmtree(venv, ignore_errors=True)
        building.rename(venv)
    except OSError:
        shutil.rmtree(building, ignore_errors=True)
    if not (venv / MARKER).is_file():
        pytest.fail(f"could not set up {venv}")
    return _python(venv)


@pytest.fixture(scope="session")
def mlflow2_python() -> Path:
    return ensure_mlflow2_python()


SCRIPT = r"""
import json, os, sys, tempfile
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType

uri, experiment_name, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
assert mlflow.__version__.startswith("2."), mlflow.__version__
mlflow.set_tracking_uri(uri)
client = MlflowClient(uri)
out = {"version": mlflow.__version__}

experiment = mlflow.set_experiment(experiment_name)
out["experiment_id"] = experiment.experiment_id
out["artifact_location"] = experiment.artifact_location

with mlflow.start_run(run_name="legacy-run") as run:
    run_id = run.info.run_id
    mlflow.log_param("lr", 0.05)
    mlflow.log_params({"optimizer": "sgd", "epochs": 3})
    for step, loss in enumerate([0.9, 0.6, 0.4]):
        mlflow.log_metric("loss", loss, step=step)
    mlflow.log_metrics({"acc": 0.8, "f1": 0.7}, step=2)
    mlflow.set_tag("team", "legacy")
    mlflow.set_tags({"stage": "old", "client": "2.x"})
    client.log_batch(run_id,
                     metrics=[Metric("batched", i * 0.5, 1_700_000_000_000 + i, i) for i in range(4)],
                     params=[Param("batch_param", "yes")], tags=[RunTag("batch_tag", "yes")])
    with mlflow.start_run(run_name="legacy-child", nested=True) as child:
        mlflow.log_metric("loss", 5.0)
    path = os.path.join(workdir, "hello.txt")
    with open(path, "wb") as f:
        f.write(b"hello from mlflow 2\n\x00\x01binary")
    mlflow.log_artifact(path)
    mlflow.log_artifact(path, artifact_path="nested/dir")
    mlflow.log_text("text body", "notes/t.txt")
    mlflow.log_dict({"a": [1, 2]}, "cfg.json")
out["run_id"], out["child_id"] = run_id, child.info.run_id

for sub in ("dl1", "dl2"):
    os.makedirs(os.path.join(workdir, sub))
dl = client.download_artifacts(run_id, "hello.txt", os.path.join(workdir, "dl1"))
out["downloaded"] = open(dl, "rb").read().hex()
dl_dir = client.download_artifacts(run_id, "nested", os.path.join(workdir, "dl2"))
out["downloaded_dir"] = sorted(
    os.path.relpath(os.path.join(d, f), dl_dir) for d, _, files in os.walk(dl_dir) for f in files)
out["root_listing"] = sorted((f.path, f.is_dir) for f in client.list_artifacts(run_id))
out["cfg"] = mlflow.artifacts.load_dict(f"runs:/{run_id}/cfg.json")

fetched = client.get_run(run_id)
out["status"] = fetched.info.status
out["run_name"] = fetched.info.run_name
out["params"] = fetched.data.params
out["metrics"] = fetched.data.metrics
out["tags"] = {k: v for k, v in fetched.data.tags.items()
               if not k.startswith("mlflow.") or k == "mlflow.runName"}
out["child_parent"] = client.get_run(child.info.run_id).data.tags.get("mlflow.parentRunId")

out["history"] = [[m.step, m.value] for m in client.get_metric_history(run_id, "loss")]
out["batched"] = [[m.step, m.value, m.timestamp] for m in client.get_metric_history(run_id, "batched")]

found = client.search_runs([experiment.experiment_id], "metrics.loss < 1 and params.optimizer = 'sgd'")
out["search_filtered"] = [r.info.run_id for r in found]
ordered = client.search_runs([experiment.experiment_id], order_by=["metrics.loss DESC"])
out["search_ordered"] = [r.info.run_name for r in ordered]
page = client.search_runs([experiment.experiment_id], max_results=1, order_by=["metrics.loss ASC"])
rest = client.search_runs([experiment.experiment_id], max_results=1, order_by=["metrics.loss ASC"],
                          page_token=page.token)
out["paged"] = [[r.info.run_name for r in page], [r.info.run_name for r in rest], rest.token]
listed = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list")
out["fluent_count"] = len(listed)

try:
    client.log_param(run_id, "lr", "0.5")
    out["param_change_error"] = None
except mlflow.exceptions.MlflowException as exc:
    out["param_change_error"] = exc.error_code
try:
    client.get_run("0" * 32)
    out["missing_run_error"] = None
except mlflow.exceptions.MlflowException as exc:
    out["missing_run_error"] = exc.error_code

client.delete_run(child.info.run_id)
out["after_delete"] = sorted(r.info.run_name for r in client.search_runs([experiment.experiment_id]))
out["deleted_only"] = [r.info.run_name for r in client.search_runs([experiment.experiment_id],
                                                                   run_view_type=ViewType.DELETED_ONLY)]
client.restore_run(child.info.run_id)
out["experiments"] = [e.name for e in client.search_experiments(filter_string=f"name = '{experiment_name}'")]
print("RESULT " + json.dumps(out))
"""


def test_mlflow_2x_client_flow(mlflow2_python, server, tmp_path):
    script = tmp_path / "legacy_flow.py"
    script.write_text(SCRIPT)
    name = f"legacy-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    env.update(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="120",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        GIT_PYTHON_REFRESH="quiet",
    )
    result = subprocess.run(
        [str(mlflow2_python), str(script), server.url, name, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (
        f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}"
        f"\n--- stderr ---\n{result.stderr[-6000:]}"
    )
    out = json.loads(lines[-1][len("RESULT ") :])

    assert out["version"] == REQUIREMENT.split("==")[1]
    exp_id, run_id, child_id = out["experiment_id"], out["run_id"], out["child_id"]
    assert out["artifact_location"] == f"mlflow-artifacts:/{exp_id}"
    assert out["status"] == "FINISHED"
    assert out["run_name"] == "legacy-run"
    assert out["params"] == {"lr": "0.05", "optimizer": "sgd", "epochs": "3", "batch_param": "yes"}
    assert out["metrics"] == {"loss": 0.4, "acc": 0.8, "f1": 0.7, "batched": 1.5}
    assert out["tags"] == {
        "team": "legacy",
        "stage": "old",
        "client": "2.x",
        "batch_tag": "yes",
        "mlflow.runName": "legacy-run",
    }
    assert out["child_parent"] == run_id
    assert out["history"] == [[0, 0.9], [1, 0.6], [2, 0.4]]
    assert out["batched"] == [[i, i * 0.5, 1_700_000_000_000 + i] for i in range(4)]

    assert bytes.fromhex(out["downloaded"]) == b"hello from mlflow 2\n\x00\x01binary"
    assert out["downloaded_dir"] == ["dir/hello.txt"]
    assert out["root_listing"] == [
        ["cfg.json", False],
        ["hello.txt", False],
        ["nested", True],
        ["notes", True],
    ]
    assert out["cfg"] == {"a": [1, 2]}

    assert out["search_filtered"] == [run_id]
    assert out["search_ordered"] == ["legacy-child", "legacy-run"]
    assert out["paged"] == [["legacy-run"], ["legacy-child"], None]
    assert out["fluent_count"] == 2
    assert out["param_change_error"] == "INVALID_PARAMETER_VALUE"
    assert out["missing_run_error"] == "RESOURCE_DOES_NOT_EXIST"
    assert out["after_delete"] == ["legacy-run"]
    assert out["deleted_only"] == ["legacy-child"]
    assert out["experiments"] == [name]
    assert child_id != run_id
