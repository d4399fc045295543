"""Ray Tune + Optuna sweep over memory size and loss weights, ASHA early stopping, best model out.

    python tune/sweep.py --space tune/space_cpu.yaml                    # a fresh sweep (or --trials N)
    python tune/sweep.py --space tune/space_cpu.yaml --resume           # continue an interrupted one
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python tune/sweep.py --space tune/space_cpu.yaml

Each trial runs tmr's one-process training loop (one worker per trial: right for small clusters)
and reports every epoch; Optuna's TPE proposes, ASHA stops weak trials at its rungs. Out, under
--out: trials.csv / trials.json (params, best val MRR, epochs run, seconds), sweep.png, and
best_model/ (the best trial's best epoch, a model directory serve/ can load) with its config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ray
import yaml
from ray import tune

from tmr.atomic import atomic_directory
from tmr.config import load_config
from tmr.data.sources import input_overrides
from tmr.distributed import evaluate_model, init_ray
from tmr.train import prepare_caches

DISTRIBUTIONS = {"choice": tune.choice, "uniform": lambda b: tune.uniform(*b), "loguniform": lambda b: tune.loguniform(*b),
                 "randint": lambda b: tune.randint(*b)}


def search_space(spec: dict) -> dict:
    """YAML {"key.path": {"loguniform": [lo, hi]}} -> Tune's search space (which OptunaSearch converts)."""
    space = {}
    for key, dist in spec.items():
        (kind, bounds), = dist.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"{key}: unknown distribution {kind!r}; use one of {sorted(DISTRIBUTIONS)}")
        space[key] = DISTRIBUTIONS[kind](bounds)
    return space


def run_trial(params: dict, base: str, overrides: list[str], data: str, threads: int) -> None:
    """One trial: train with the sampled config, report every epoch, checkpoint the best model directory."""
    import torch

    from tmr.train import fit

    torch.set_num_threads(threads)
    config = load_config(base, overrides + [f"{key}={value}" for key, value in params.items()])
    config.data = data
    config.output = str(Path(tune.get_context().get_trial_dir()) / "run")

    def report(record: dict, improved: bool) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        checkpoint = tune.Checkpoint.from_directory(Path(config.output) / "best") if improved else None
        tune.report(metrics, checkpoint=checkpoint)

    fit(config, progress=False, on_epoch=report, final_pools=("split",))  # the winner alone gets the full pool


def trial_table(results, space_keys: list[str]) -> list[dict]:
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row = {"trial": Path(result.path).name, **{k: result.config.get(k) for k in space_keys}}
        if history is None or "val_mrr" not in history:
            rows.append({**row, "best_val_mrr": None, "epochs": 0, "seconds": None, "error": str(result.error)})
            continue
        row.update(best_val_mrr=float(history["val_mrr"].max()), epochs=int(history["epoch"].max()),
                   seconds=float(history["time_total_s"].max()),
                   curve=[float(v) for v in history["val_mrr"]], error=None if result.error is None else str(result.error))
        rows.append(row)
    return sorted(rows, key=lambda r: -(r["best_val_mrr"] or -1))


def plot(rows: list[dict], space_keys: list[str], max_epochs: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    done = [r for r in rows if r["best_val_mrr"] is not None]
    fig, axes = plt.subplots(1, len(space_keys) + 1, figsize=(3.2 * (len(space_keys) + 1), 3.4))
    for ax, key in zip(axes, space_keys):
        ax.scatter([r[key] for r in done], [r["best_val_mrr"] for r in done],
                   c=["tab:blue" if r["epochs"] >= max_epochs else "tab:red" for r in done])
        if key != "model.projector.memory_size" and all(isinstance(r[key], float) for r in done):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap on a short decade
        ax.set(xlabel=key.split(".")[-1], ylabel="best val MRR (%)")
    for r in done:
        axes[-1].plot(range(1, len(r["curve"]) + 1), r["curve"], "o-", markersize=4,
                      color="tab:blue" if r["epochs"] >= max_epochs else "tab:red")
    axes[-1].set(xlabel="epoch", ylabel="val MRR (%)")
    fig.suptitle("each trial's best validation MRR (blue: ran every epoch; red: ASHA stopped it)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(space_file: str, out: str, trials: int | None = None, resume: bool = False, concurrency: int | None = None
          ) -> dict:
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    spec = yaml.safe_load(Path(space_file).read_text())
    metric, base, overrides = spec.get("metric", "val_mrr"), spec.get("base", "cpu"), list(spec.get("overrides", []))
    max_epochs = load_config(base, overrides).train.epochs
    # every input a trial reads, resolved here to absolute paths: trials of a sweep submitted as a Ray job
    # run in a copy of the code with no ../shared beside it
    inputs = input_overrides(load_config(base, overrides + ([f"data={spec['data']}"] if spec.get("data") else [])),
                             mol2vec=any(k.startswith("model.molecule.") for k in spec["space"]))
    data, overrides = inputs[0].split("=", 1)[1], overrides + inputs[1:]
    threads = int(spec.get("cpus_per_trial", 1))
    out_dir = Path(out).resolve()
    # corpora, graphs and text states on all cores before the trials (tmr.train.prepare_caches): the
    # base's; a space over corpus.* or model.text.* keys leaves its other variants to the trials
    base_config = load_config(base, overrides)
    base_config.data = data
    prepare_caches(base_config)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, overrides=overrides, data=data, threads=threads), {"cpu": threads})
    experiment = out_dir / "tune"
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True)
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec["space"]),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=trials or spec.get("trials", 8),
                # `start_from`: configurations tried first (the preset's own values: the sweep's reference)
                search_alg=OptunaSearch(seed=spec.get("seed", 0), points_to_evaluate=spec.get("start_from")),
                scheduler=ASHAScheduler(time_attr="epoch", max_t=max_epochs, **spec.get("asha", {})),
                max_concurrent_trials=concurrency or max(1, cpus // threads)),
            run_config=tune.RunConfig(name="tune", storage_path=str(out_dir),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    results = tuner.fit()
    keys = list(spec["space"])
    rows = trial_table(results, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "trials.json").write_text(json.dumps(rows, indent=2))
    import csv

    with open(out_dir / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial", *keys, "best_val_mrr", "epochs", "seconds", "error"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, keys, max_epochs, out_dir / "sweep.png")
    best = results.get_best_result(metric=metric, mode="max", scope="all")
    checkpoint = best.get_best_checkpoint(metric, "max")
    with atomic_directory(out_dir / "best_model") as staging:
        checkpoint.to_directory(str(staging))
    best_config = load_config(base, overrides + [f"{k}={v}" for k, v in best.config.items()])
    best_config.data = data
    full_pool = evaluate_model(str(out_dir / "best_model"), best_config)
    summary = {"best_trial": Path(best.path).name, "best_val_mrr": rows[0]["best_val_mrr"],
               "best_validation": full_pool,
               "best_params": {k: best.config[k] for k in keys}, "base": base, "overrides": overrides,
               "trials": len(rows), "stopped_early": sum(r["epochs"] < max_epochs for r in rows if r["error"] is None),
               "best_model": str(out_dir / "best_model")}
    (out_dir / "best_config.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(Path(__file__).with_name("space_cpu.yaml")))
    parser.add_argument("--trials", type=int, help="number of trials (default: the space file's)")
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--resume", action="store_true", help="continue the sweep stored under --out")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    init_ray(args.num_cpus, object_store_mib=256)
    print(json.dumps(sweep(args.space, args.out, args.trials, args.resume), indent=2))


if __name__ == "__main__":
    sys.exit(main())
