"""A tiny Ray Tune + Optuna sweep: ASHA stops trials early, the table and best model are written,
and a sweep interrupted like a user would (Ctrl-C on its driver) continues with Tuner.restore."""

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray
import yaml

from tmr.model import from_pretrained

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tune"))
from sweep import sweep  # noqa: E402


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}: the dotted keys the sweep and runs files use."""
    return {k: v for key, value in tree.items()
            for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}


def results_reported(out: Path) -> int:
    return sum(1 for f in (out / "tune").glob("*/result.json") if f.stat().st_size > 0)


def test_tiny_sweep_is_interrupted_resumed_stops_early_and_writes_results(tmp_path, train_root):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "tiny", "data": str(train_root), "metric": "val_mrr", "trials": 4, "cpus_per_trial": 1,
        "overrides": ["train.epochs=3", "train.max_train_pairs=32", "train.batch_size=16"],
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "start_from": [{"model.projector.memory_size": 4, "train.lr": 1e-3}],  # a reference configuration, tried first
        "space": {"model.projector.memory_size": {"choice": [0, 4, 8]}, "train.lr": {"loguniform": [1e-6, 3e-3]}},
    }))
    out = tmp_path / "sweep"
    driver = subprocess.Popen([sys.executable, str(ROOT / "tune/sweep.py"), "--space", str(space), "--out", str(out),
                               "--num-cpus", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 600
    while results_reported(out) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert driver.poll() is None, "the sweep finished before it could be interrupted"
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: Tune saves the experiment (and the Optuna study) and stops
    driver.wait(timeout=300)
    from ray import tune

    assert tune.Tuner.can_restore(str(out / "tune"))
    before = {d.name: ((d / "params.json").read_text(), (d / "result.json").read_text().splitlines())
              for d in (out / "tune").iterdir() if (d / "params.json").exists()}
    assert 2 <= len(before) <= 4 and sum(len(lines) for _, lines in before.values()) >= 2
    # the interrupted driver writes the table of what it has; the resumed sweep must add to it
    partial = json.loads((out / "trials.json").read_text()) if (out / "trials.json").exists() else []
    epochs_before = sum(r["epochs"] for r in partial)

    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "tune")}})
    try:
        resumed = sweep(str(space), str(out), resume=True)
    finally:
        ray.shutdown()
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 4 and all(r["error"] is None for r in rows), rows
    assert sum(r["epochs"] for r in rows) > epochs_before  # the restore trained what was left
    # a restore, not a fresh sweep: the trials started before the interrupt are the same trials (ids,
    # Optuna's parameters) and what they reported is kept, not trained again
    assert set(before) <= {r["trial"] for r in rows}, (sorted(before), [r["trial"] for r in rows])
    for name, (params, lines) in before.items():
        assert (out / "tune" / name / "params.json").read_text() == params, name
        assert (out / "tune" / name / "result.json").read_text().splitlines()[:len(lines)] == lines, name
    assert resumed["stopped_early"] >= 1  # ASHA cut at least one trial before its 3 epochs
    assert min(r["epochs"] for r in rows) < 3 and max(r["epochs"] for r in rows) == 3
    with open(out / "trials.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and {"model.projector.memory_size", "train.lr", "best_val_mrr", "epochs"} <= set(table[0])
    assert {"model.projector.memory_size": 4, "train.lr": 1e-3} in [
        {k: r[k] for k in ("model.projector.memory_size", "train.lr")} for r in rows]
    assert resumed["best_val_mrr"] == max(r["best_val_mrr"] for r in rows)
    model = from_pretrained(out / "best_model")
    assert model.config.projector.memory_size == resumed["best_params"]["model.projector.memory_size"]
    assert (out / "sweep.png").stat().st_size > 10_000


def test_results_table_runs_resolve_to_the_recipes_the_docs_name():
    from compare import resolve_bases, run_config

    from tmr.config import load_config

    runs = resolve_bases(yaml.safe_load((ROOT / "tune/runs_cpu.yaml").read_text())["runs"])
    configs = {name: run_config(spec).to_dict() for name, spec in runs.items()}
    assert configs["full"] == load_config("cpu").to_dict()
    assert configs["full"]["corpus"]["real"] and configs["full"]["corpus"]["ontology"]  # everything the root offers
    # the preset before the derived corpus: real pairs only, 40 epochs; nothing else differs from the
    # preset of 2026-12-03's day (`names_x3`)
    real_only = copy.deepcopy(configs["real_e40"])
    assert (real_only["corpus"]["ontology"], real_only["train"]["epochs"]) == (False, 40)
    real_only["corpus"]["ontology"], real_only["train"]["epochs"] = True, configs["names_x3"]["train"]["epochs"]
    real_only["corpus"]["real_repeat"] = configs["names_x3"]["corpus"]["real_repeat"]
    assert real_only == configs["names_x3"]
    # the preset is the measured `sweep_best_e6` row: names on every derived text, real pairs 3 times per
    # epoch, the sweep's winner over 6 epochs
    assert configs["sweep_best_e6"] == configs["full"]
    assert (configs["full"]["corpus"]["ontology_names"], configs["full"]["corpus"]["real_repeat"]) == (1, 3)
    # clip on the same data as the method, the derived corpus alone: one change each
    assert configs["clip_mixed"]["corpus"] == configs["mixed_e8"]["corpus"]
    assert configs["clip_mixed_names"]["corpus"] == configs["mixed_names100"]["corpus"]
    assert configs["clip_names_x3"]["corpus"] == configs["full"]["corpus"]
    assert configs["clip_mixed"]["train"]["epochs"] == configs["names_x3"]["train"]["epochs"]
    assert (configs["derived_only"]["corpus"]["real"], configs["derived_only"]["corpus"]["ontology"]) == (False, True)
    # lever probes on the mixed data: each one key away from the preset
    # (the rows measured before the names are one key from the pinned preset before them, `mixed_e8`)
    for name, key, value in (("mixed_first_order_both", "loss.first_order", "both"),
                             ("mixed_k128", "model.projector.memory_size", 128),
                             ("mixed_no_adversarial", "loss.adversarial_weight", 0),
                             ("mixed_names50", "corpus.ontology_names", 0.5),
                             ("mixed_names100", "corpus.ontology_names", 1.0)):
        probe, preset = flat(configs[name]), flat(configs["mixed_e8"])
        assert {k for k in probe if probe[k] != preset[k]} == {key} and probe[key] == value, name
    # the sweep's winner on the preset's data: the preset it ran on (`names_x3`) with the five swept keys
    # changed, nothing else; the preset now is that winner in 6 epochs instead of 8
    swept = yaml.safe_load((ROOT / "tune/space_mixed.yaml").read_text())["space"]
    probe, preset = flat(configs["sweep_mixed_best"]), flat(configs["names_x3"])
    assert {k for k in probe if probe[k] != preset[k]} == set(swept)
    probe, preset = flat(configs["full"]), flat(configs["sweep_mixed_best"])
    assert {k for k in probe if probe[k] != preset[k]} == {"train.epochs"} and probe["train.epochs"] == 6
    shorter = copy.deepcopy(configs["full_e30"])  # the preset before 40 epochs: only the length differs
    assert shorter["train"]["epochs"] == 30 and configs["real_e40"]["train"]["epochs"] == 40
    shorter["train"]["epochs"] = 40
    assert shorter == configs["real_e40"]
    previous = copy.deepcopy(configs["full_no_token_dropout"])  # the preset before token dropout: only that differs
    assert previous["model"]["text"]["token_dropout"] == 0 and configs["full_e30"]["model"]["text"]["token_dropout"] > 0
    previous["model"]["text"]["token_dropout"] = configs["full_e30"]["model"]["text"]["token_dropout"]
    assert previous == configs["full_e30"]
    # every ablation removes one part from its recipe and keeps the rest
    for recipe, prefix in (("mixed_e8", "mixed_no_"), ("real_e40", "cpu_no_"), ("full_no_token_dropout", "full_no_"),
                           ("full_b64", "no_")):
        removed = {"memory_bank": configs[f"{prefix}memory_bank"]["model"]["projector"]["memory_size"],
                   "second_order": configs[f"{prefix}second_order"]["loss"]["intra_weight"]
                   + configs[f"{prefix}second_order"]["loss"]["cross_weight"],
                   "adversarial": configs[f"{prefix}adversarial"]["loss"]["adversarial_weight"]}
        assert removed == {"memory_bank": 0, "second_order": 0, "adversarial": 0}, recipe
        for part in ("memory_bank", "second_order", "adversarial"):
            assert configs[f"{prefix}{part}"]["train"] == configs[recipe]["train"], (recipe, part)
            assert configs[f"{prefix}{part}"]["model"]["text"] == configs[recipe]["model"]["text"], (recipe, part)


def test_an_interrupted_comparison_resumes_keeping_its_finished_trials(tmp_path, train_root):
    runs = tmp_path / "runs.yaml"
    runs.write_text(yaml.safe_dump({"runs": {"tiny": {"preset": "tiny", "overrides": [
        "train.epochs=1", "train.max_train_pairs=32", "train.batch_size=16"]}}}))
    out = tmp_path / "compare"
    command = [sys.executable, str(ROOT / "tune/compare.py"), "--runs", str(runs), "--seeds", "1", "2", "--out", str(out),
               "--num-cpus", "1"]  # one trial at a time: the first finishes while the second runs
    env = {**os.environ, "TMR_DATA": str(train_root)}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    finished = lambda: [f for f in (out / "compare").glob("*/result.json") if f.stat().st_size > 0]  # noqa: E731
    deadline = time.time() + 600
    while not finished() and driver.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert driver.poll() is None, "the comparison finished before it could be interrupted"
    os.killpg(driver.pid, signal.SIGINT)
    driver.wait(timeout=300)
    (first,) = finished()
    kept = json.loads(first.read_text())

    other = subprocess.run(command[:5] + ["3"] + command[6:] + ["--resume"], env=env, capture_output=True, text=True)
    assert other.returncode != 0 and "seeds [1, 2]" in other.stderr  # another grid: refused, nothing overwritten
    recipe = runs.read_text()
    runs.write_text(recipe.replace("train.epochs=1", "train.epochs=2"))
    edited = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True)
    assert edited.returncode != 0 and "configuration of tiny changed" in edited.stderr  # another recipe: refused too
    runs.write_text(recipe)

    subprocess.run(command + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    table = json.loads((out / "quality.json").read_text())
    assert [t["seed"] for t in table["trials"]] == [1, 2] and not any("error" in t for t in table["trials"])
    assert table["summary"]["tiny"]["seeds"] == [1, 2]  # in grid order, however the resumed trials came back
    assert first.read_text().count("\n") <= 1 and json.loads(first.read_text()) == kept  # kept, not trained again
    kept_row = next(t for t in table["trials"] if t["seed"] == kept["config"]["seed"])
    assert kept_row["split.text_to_molecule.mrr"] == kept["split.text_to_molecule.mrr"]
    assert "--resume" not in table["command"]


def test_the_mixed_sweep_starts_from_the_preset():
    """tune/space_mixed.yaml's first trial is the values of the `cpu` preset it ran on (`names_x3`, the
    preset until its winner replaced them): the sweep's reference."""
    from compare import resolve_bases, run_config

    spec = yaml.safe_load((ROOT / "tune/space_mixed.yaml").read_text())
    runs = resolve_bases(yaml.safe_load((ROOT / "tune/runs_cpu.yaml").read_text())["runs"])
    preset = flat(run_config(runs["names_x3"]).to_dict())
    (start,) = spec["start_from"]
    assert set(start) == set(spec["space"])
    assert {key: preset[key] for key in start} == start
