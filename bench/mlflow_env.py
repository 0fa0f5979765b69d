"""The reference MLflow server lives in a virtualenv of its own, so its pins never touch the project's."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

MLFLOW_VERSION = "3.17.2"
# SQLAlchemy 2.1 (what mlflow 3.17.2 pulls in) maps a bare postgresql:// URI to psycopg 3, so both
# drivers go in: the plain URI works, and psycopg2 serves anyone who spells postgresql+psycopg2://.
# The artifact-store SDKs MLflow's own stores import, for the side-by-side store benchmark.
PACKAGES = [f"mlflow[auth]=={MLFLOW_VERSION}", "psycopg2-binary", "psycopg[binary]", "boto3",
            "azure-storage-blob", "azure-identity", "google-cloud-storage"]


def ensure(venv: Path) -> Path:
    """Create the venv on first use and return the path of its `mlflow` script."""
    mlflow = venv / "bin" / "mlflow"
    # The marker names the package set, so changing PACKAGES reinstalls instead of reusing.
    marker = venv / f".installed-{hashlib.sha1(' '.join(PACKAGES).encode()).hexdigest()[:12]}"
    if mlflow.exists() and marker.exists():
        return mlflow
    print(f"creating the reference MLflow venv in {venv} (first use; takes a minute or two)", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *PACKAGES], check=True)
    marker.touch()
    return mlflow
