"""The README's results table: runs (a preset plus overrides) x seeds, as one Ray Tune grid.

    python tune/compare.py --runs tune/runs_cpu.yaml --seeds 42 43 44 --out results/quality
    python tune/compare.py --runs tune/runs_cpu.yaml --seeds 42 43 44 --out results/quality --resume

Each (run, seed) is one trial: tmr's training loop on the provisional re-split (or the real split
when train.txt exists), its best epoch by validation MRR scored on the select set with both
pools. Trials run side by side, one CPU each. Out, under --out: quality.json (every trial's
metrics, and per run the mean and sample standard deviation over seeds) and quality.md (the
table as the README shows it, with the command that made it). A comparison that was stopped (Ctrl-C,
a machine going back) continues with the same command plus --resume (Tuner.restore): finished
trials are kept, the ones that were running start again from their first epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import yaml
from ray import tune

from tmr.config import RunConfig, load_config
from tmr.data.sources import input_overrides
from tmr.distributed import init_ray
from tmr.train import prepare_caches

# (key in the flattened metrics, column title); "split" = the select set's own pool, "all" = Text2Mol's pool
COLUMNS = [
    ("split.text_to_molecule.hits@1", "T→M H@1"), ("split.text_to_molecule.hits@10", "T→M H@10"),
    ("split.text_to_molecule.mrr", "T→M MRR"), ("split.molecule_to_text.hits@1", "M→T H@1"),
    ("split.molecule_to_text.hits@10", "M→T H@10"), ("split.molecule_to_text.mrr", "M→T MRR"),
    ("all.text_to_molecule.hits@1", "T→M H@1 (all)"), ("all.text_to_molecule.hits@10", "T→M H@10 (all)"),
    ("all.text_to_molecule.mrr", "T→M MRR (all)"), ("all.text_to_molecule.mean_rank", "T→M mean rank (all)"),
    ("class_queries.precision@10", "class queries P@10"),
]


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = value
    return out


def run_config(spec: dict, overrides: list[str] | None = None) -> RunConfig:
    """A resolved run of the runs file (its preset, then its overrides, then these)."""
    return load_config(spec.get("preset", "cpu"), list(spec.get("overrides", [])) + list(overrides or []))


def run_one(params: dict, runs: dict, data: str, threads: int, inputs: dict | None = None) -> None:
    import time

    import torch

    from tmr.train import fit

    torch.set_num_threads(threads)
    config = run_config(runs[params["run"]], [f"train.seed={params['seed']}"] + (inputs or {}).get(params["run"], []))
    config.data = data
    config.output = str(Path(tune.get_context().get_trial_dir()) / "run")
    started = time.time()
    result = fit(config, progress=False)
    metrics = flatten(result["validation"])
    metrics.update(best_epoch=result["best_epoch"], seconds=time.time() - started)
    tune.report(metrics)


def prepare(runs: dict, data: str, inputs: dict) -> None:
    """The caches every run reads (corpora, graphs, text states), filled here on all of the machine's
    cores before the one-CPU trials start (tmr.train.prepare_caches); once per distinct data and text
    model, so runs that differ only in training settings share one pass."""
    done = set()
    for name, spec in runs.items():
        config = run_config(spec, inputs.get(name, []))
        config.data = data
        key = json.dumps([asdict(config.corpus), asdict(config.model.text), config.train.max_train_pairs,
                          config.train.cache_text_states, config.train.text_states_precision], sort_keys=True, default=str)
        if key not in done:
            done.add(key)
            prepare_caches(config)


def summarise(rows: list[dict]) -> dict:
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    summary = {}
    for run, trials in by_run.items():
        summary[run] = {"seeds": [t["seed"] for t in trials]}
        for key, _ in COLUMNS + [("seconds", "")]:
            values = [t[key] for t in trials if key in t]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[run][key] = {"mean": statistics.fmean(values), "std": spread}
    return summary


def markdown(summary: dict, runs: dict, command: str) -> str:
    lines = ["| run | " + " | ".join(title for _, title in COLUMNS) + " | minutes |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for run, stats in summary.items():
        cells = [f"{stats[k]['mean']:.1f} ± {stats[k]['std']:.1f}" if k in stats else "–" for k, _ in COLUMNS]
        minutes = stats["seconds"]["mean"] / 60 if "seconds" in stats else float("nan")
        lines.append(f"| {runs[run].get('title', run)} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines) + f"\n\nMean ± sample standard deviation over seeds {summary and next(iter(summary.values()))['seeds']}; `{command}`\n"


def resolve_bases(runs: dict) -> dict:
    """Each run with `base: other` gets other's preset and overrides first, then its own overrides."""
    def resolved(name: str) -> dict:
        spec = dict(runs[name])
        if "base" in spec:
            base = resolved(spec.pop("base"))
            spec = {**base, **spec, "overrides": list(base.get("overrides", [])) + list(spec.get("overrides", []))}
        return spec
    return {name: resolved(name) for name in runs}


def compare(runs_file: str, seeds: list[int], out: str, only: list[str] | None = None, threads: int = 1,
            resume: bool = False) -> dict:
    runs = resolve_bases(yaml.safe_load(Path(runs_file).read_text())["runs"])
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise SystemExit(f"--only: no run named {', '.join(unknown)} in {runs_file}")
        runs = {name: spec for name, spec in runs.items() if name in only}
    # each run's inputs resolved here to absolute paths (trials of a comparison submitted as a Ray job run
    # in a copy of the code with no ../shared beside it); a missing one fails now, naming its fix
    resolved = {name: input_overrides(run_config(spec)) for name, spec in runs.items()}  # ["data=...", ...]
    data = next(iter(resolved.values()))[0].split("=", 1)[1]
    inputs = {name: overrides[1:] for name, overrides in resolved.items()}
    out_dir = Path(out).resolve()
    prepare(runs, data, inputs)
    trainable = tune.with_resources(tune.with_parameters(run_one, runs=runs, data=data, threads=threads,
                                                         inputs=inputs), {"cpu": threads})
    # the grid and each run's resolved configuration: a resumed table must be of one recipe per row
    configs = json.loads(json.dumps({name: run_config(spec).to_dict() for name, spec in runs.items()}))  # as stored
    experiment, grid = out_dir / "compare", {"runs": list(runs), "seeds": list(seeds), "configs": configs}
    if resume and tune.Tuner.can_restore(str(experiment)):
        stored = json.loads((out_dir / "grid.json").read_text()) if (out_dir / "grid.json").exists() else None
        if stored is None or (stored["runs"], stored["seeds"]) != (grid["runs"], grid["seeds"]):
            held = f"runs {stored['runs']} x seeds {stored['seeds']}" if stored else "a comparison without grid.json"
            raise SystemExit(f"--resume: {out} holds {held}, not runs {grid['runs']} x seeds {grid['seeds']}; "
                             "resume with those, or start afresh with another --out")
        changed = [name for name in runs if stored["configs"].get(name) != configs[name]]
        if changed:  # finished trials trained the stored recipe; the rest would train the edited one
            raise SystemExit(f"--resume: the configuration of {', '.join(changed)} changed since {out} was started "
                             "(the preset or the runs file was edited); start afresh with another --out")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, restart_errored=True)
    else:
        if resume:
            print(f"--resume: nothing to resume under {out}; starting afresh", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "grid.json").write_text(json.dumps(grid))
        tuner = tune.Tuner(trainable,
                           param_space={"run": tune.grid_search(grid["runs"]), "seed": tune.grid_search(grid["seeds"])},
                           run_config=tune.RunConfig(name="compare", storage_path=str(out_dir)))
    results = tuner.fit()
    rows = []
    for result in results:
        row = {"run": result.config["run"], "seed": result.config["seed"], **(result.metrics or {})}
        if result.error is not None:
            row["error"] = str(result.error)
        rows.append(row)
    rows.sort(key=lambda r: (list(runs).index(r["run"]), r["seed"]))  # a resumed grid comes back reordered
    finished = [r for r in rows if "error" not in r and COLUMNS[0][0] in r]  # not errored, not interrupted
    summary = summarise(finished)
    command = "python tune/compare.py " + " ".join(a for a in sys.argv[1:] if a != "--resume")
    (out_dir / "quality.json").write_text(json.dumps({"command": command, "trials": rows, "summary": summary}, indent=2))
    (out_dir / "quality.md").write_text(markdown(summary, runs, command))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(Path(__file__).with_name("runs_cpu.yaml")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--only", nargs="*", help="names of runs from --runs (default: all)")
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--resume", action="store_true", help="continue the comparison stored under --out")
    args = parser.parse_args()
    init_ray(args.num_cpus, object_store_mib=256)
    compare(args.runs, args.seeds, args.out, args.only, resume=args.resume)
    print((Path(args.out) / "quality.md").read_text())


if __name__ == "__main__":
    main()
