"""A tiny Ray Tune + Optuna sweep: ASHA stops trials early, the table and best model are written,
and an interrupted sweep (a trial killed) continues with Tuner.restore."""

import csv
import json
import sys
from pathlib import Path

import pytest
import ray
import yaml

from tmr.model import from_pretrained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tune"))
from sweep import sweep  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "tune")}})
    yield
    ray.shutdown()


def test_tiny_sweep_stops_early_writes_results_and_resumes(local_ray, tmp_path, train_root):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "tiny", "data": str(train_root), "metric": "val_mrr", "trials": 4, "cpus_per_trial": 1,
        "overrides": ["train.epochs=3", "train.max_train_pairs=32", "train.batch_size=16"],
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "space": {"model.projector.memory_size": {"choice": [0, 4, 8]}, "train.lr": {"loguniform": [1e-6, 3e-3]}},
    }))
    out = tmp_path / "sweep"
    first = sweep(str(space), str(out), crash_marker=str(tmp_path / "crashed"))
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 4 and sum(r["error"] is not None for r in rows) == 1  # the drill killed one trial
    trials = {r["trial"] for r in rows}

    resumed = sweep(str(space), str(out), resume=True)
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 4 and all(r["error"] is None for r in rows)  # same study, the killed trial re-run
    assert {r["trial"] for r in rows} == trials
    assert resumed["stopped_early"] >= 1  # ASHA cut at least one trial before its 3 epochs
    assert min(r["epochs"] for r in rows) < 3 and max(r["epochs"] for r in rows) == 3
    with open(out / "trials.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and {"model.projector.memory_size", "train.lr", "best_val_mrr", "epochs"} <= set(table[0])
    assert resumed["best_val_mrr"] == max(r["best_val_mrr"] for r in rows)
    model = from_pretrained(out / "best_model")
    assert model.config.projector.memory_size == resumed["best_params"]["model.projector.memory_size"]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert first["trials"] == 4
