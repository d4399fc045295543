"""`ray job submit` as the README runs it: a running local cluster (`ray start --head`), the job in a copy
of the code with no ../shared beside it; every input resolved by the job's driver, and what no retry can
fix reported by the driver in seconds, before any worker starts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "results", "__pycache__", "*.egg-info", ".pytest_cache", "build")


def job_env() -> dict:
    """The README's shell: `export RAY_AUTH_MODE=token` (Ray 2.60 clusters require a token; the head
    generates ~/.ray/auth_token and the job CLI sends it), no RAY_ADDRESS of another cluster."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --block` in its own session (stopped by signalling that session alone, so other Ray
    instances on the machine live on); yields the job server's address."""
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    # the README's first command: a token in ~/.ray/auth_token unless there is one (a fresh machine has none)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=job_env(), capture_output=True, check=True)
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
                             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                             # ports of their own: another Ray on the machine (a training run) holds the defaults
                             "--dashboard-agent-listen-port", str(free_port()),
                             "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                             "--object-store-memory", str(300 * 1024**2), "--temp-dir", temp,
                             "--disable-usage-stats"], env=job_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    try:
        while subprocess.run([RAY, "job", "list", "--address", address], env=job_env(),
                             capture_output=True).returncode:
            if time.time() > deadline or head.poll() is not None:
                raise RuntimeError("the local Ray cluster did not start")
            time.sleep(2)
        yield address
    finally:  # also when it did not start: no head left running after the tests
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository whose parent has no shared/ (as a fresh clone elsewhere, or Ray's own copy)."""
    copy = tmp_path_factory.mktemp("elsewhere") / "tmr"
    shutil.copytree(ROOT, copy, ignore=SKIP)
    assert not (copy.parent / "shared").exists()
    return copy


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, train_root, chebi_root) -> Path:
    """../shared's layout elsewhere: data/chebi20/{train,validation}.txt beside data/mol2vec/tokens.npz."""
    data = tmp_path_factory.mktemp("data")
    shutil.copytree(train_root, data / "chebi20")
    (data / "mol2vec").mkdir()
    shutil.copy(chebi_root.parent / "mol2vec" / "tokens.npz", data / "mol2vec" / "tokens.npz")
    return data


def submit(address: str, checkout: Path, *command: str) -> subprocess.CompletedProcess:
    """The README's command: `ray job submit --address ... --working-dir . -- python ...`, run in the copy."""
    for _ in range(30):  # a head that has just started answers "No available agent" until its agent is up
        done = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
                               *command], cwd=checkout, env=job_env(), capture_output=True, text=True, timeout=900)
        if "No available agent" not in done.stderr:
            return done
        time.sleep(3)
    return done


def test_submitted_training_job_finds_its_inputs_and_trains(cluster, checkout, data_dir, tmp_path):
    out = tmp_path / "run"
    done = submit(cluster, checkout, "jobs/train.py", "--config", "tiny", "--workers", "1",
                  "--data", str(data_dir / "chebi20"), "model.molecule.mol2vec_features=true", "train.epochs=1",
                  f"output={out}")
    assert "succeeded" in done.stdout.lower() and done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "best" / "model.safetensors").exists() and (out / "metrics.json").exists()
    config = json.loads((out / "config.json").read_text())
    # resolved by the driver, absolute: the table beside the data root, found without a flag
    assert config["model"]["molecule"]["mol2vec_path"] == str((data_dir / "mol2vec" / "tokens.npz").resolve())
    assert config["data"] == str((data_dir / "chebi20").resolve())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["corpora"] == {"chebi20 train.txt": {"pairs": 300, "repeat": 1}}


@pytest.mark.parametrize("flag, fix", [
    ("model.molecule.mol2vec_path=/nonexistent/tokens.npz", "model.molecule.mol2vec_path"),
    ("--data=/nonexistent/chebi20", "--data"),
])
def test_a_missing_input_fails_in_the_driver_at_once_naming_the_fix(cluster, checkout, data_dir, tmp_path, flag, fix):
    data = [] if flag.startswith("--data") else ["--data", str(data_dir / "chebi20")]
    started = time.time()
    done = submit(cluster, checkout, "jobs/train.py", "--config", "tiny", *data, flag,
                  "model.molecule.mol2vec_features=true", f"output={tmp_path / 'run'}")
    logs = done.stdout + done.stderr
    assert "failed" in logs.lower() and done.returncode != 0 and fix in logs, logs[-3000:]
    assert "TrainController" not in logs and "Error count" not in logs  # no worker started, nothing retried
    assert time.time() - started < 120
    assert not (tmp_path / "run").exists()


def test_a_sweep_submitted_as_a_job_resolves_its_inputs(cluster, checkout, data_dir, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "tiny", "data": str(data_dir / "chebi20"), "metric": "val_mrr", "trials": 2, "cpus_per_trial": 1,
        "overrides": ["train.epochs=1", "train.max_train_pairs=32"],
        "space": {"model.molecule.mol2vec_features": {"choice": [True]}, "train.lr": {"loguniform": [1e-4, 1e-3]}},
    }))
    out = tmp_path / "sweep"
    done = submit(cluster, checkout, "tune/sweep.py", "--space", str(space), "--out", str(out))
    assert "succeeded" in done.stdout.lower() and done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    model_config = json.loads((out / "best_model" / "config.json").read_text())["tmr_model"]
    assert model_config["molecule"]["mol2vec_features"] and model_config["molecule"]["mol2vec_path"].startswith("/")
    assert np.isfinite(json.loads((out / "best_config.json").read_text())["best_val_mrr"])
