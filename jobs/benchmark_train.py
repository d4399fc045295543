"""Training benchmark (prints figures, writes JSON): what Ray Train + DeepSpeed cost and buy here.

    python jobs/benchmark_train.py --config cpu --steps 20 --out results/benchmark_train.json

* samples/s of the same model and global batch with 1 and with 2 Ray Train workers (DeepSpeed);
* samples/s of a DeepSpeed engine vs a plain torch loop in one process (same model, same batches),
  and vs the plain loop inside the same Ray worker, steps alternated (the engine's own cost);
* seconds per epoch of the preset on the fit split, extrapolated from the measured step time;
* peak resident memory of each process.
Each figure is the median over `--steps` steps after 3 warm-up steps, all measured in one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path

import ray
import torch

from tmr.config import config_from_dict, load_config


def timed_steps(step, batches, steps: int) -> list[float]:
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        step(batches[i % len(batches)])
        if i >= 3:
            times.append(time.perf_counter() - started)
    return times


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(config, rank: int = 0, world_size: int = 1):
    from tmr.data import load_splits, resolve_data_root
    from tmr.model import create_model
    from tmr.train import keep_freed_memory, make_collator, make_loader, seed_everything

    seed_everything(config.train.seed)
    keep_freed_memory()  # as the training loops do
    splits = load_splits(resolve_data_root(config.data), max_train_pairs=config.train.max_train_pairs,
                         corpus=config.corpus)
    model = create_model(config.model)
    loader = make_loader(splits.fit, make_collator(model, config, splits, progress=False),
                         config.train.batch_size, shuffle=True, seed=0, rank=rank, world_size=world_size)
    batches = [batch for batch, _ in zip(loader, range(8))]
    return model, batches, len(loader)


def deepspeed_worker(loop_config: dict) -> None:
    import ray.train

    from tmr.distributed import build_engine, engine_backward
    from tmr.losses import AlignmentLoss

    config = config_from_dict(loop_config["run"])
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model, batches, steps_per_epoch = prepare(config, rank, world)
    plain = plain_step(copy.deepcopy(model), config) if world == 1 else None
    engine, critic, _ = build_engine(model, config, steps_per_epoch, world, use_gpu=False)
    criterion = AlignmentLoss(config.loss)

    def step(batch):
        terms = criterion(engine(batch), critic, engine.module.logit_scale)
        engine_backward(engine, terms["loss"], world)
        engine.step()

    engine.train()
    measured = {"steps_per_epoch": steps_per_epoch}
    if plain is None:
        measured["seconds_per_step"] = statistics.median(timed_steps(step, batches, loop_config["steps"]))
    else:  # alternate engine and plain steps in this worker: the engine's own cost, free of machine noise
        engine_times, plain_times = [], []
        for i in range(loop_config["steps"] + 3):
            # whichever runs first after the other model's step finds the caches cold (measured: the
            # first of each pair ~5% slower, whichever it is), so each goes first every other step
            pair = [(step, engine_times), (plain, plain_times)]
            for run, times in (pair if i % 2 == 0 else pair[::-1]):
                started = time.perf_counter()
                run(batches[i % len(batches)])
                if i >= 3:
                    times.append(time.perf_counter() - started)
        measured.update(seconds_per_step=statistics.median(engine_times),
                        plain_seconds_per_step_same_worker=statistics.median(plain_times))
    measured["peak_rss_mib"] = peak_rss_mib()
    Path(loop_config["out"], f"rank{rank}.json").write_text(json.dumps(measured))


def plain_step(model, config):
    """One step of the plain loop (tmr.train.fit's): forward, loss, backward, optimiser and schedule."""
    from tmr.losses import AlignmentLoss, Discriminator
    from tmr.train import make_optimizer

    model.logit_scale.requires_grad_(config.loss.first_order in ("infonce", "both"))
    optimizer, scheduler = make_optimizer(model, config.train, 10**6)
    criterion, critic = AlignmentLoss(config.loss), Discriminator(config.model.embed_dim)
    model.train()

    def step(batch):
        terms = criterion(model(batch), critic, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        scheduler.step()

    return step


def run_ray(config, workers: int, steps: int, cpus: int, storage: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    threads = max(1, cpus // workers)
    out = storage / f"measured_{workers}_{int(time.time())}"
    out.mkdir(parents=True)
    TorchTrainer(
        deepspeed_worker, train_loop_config={"run": config.to_dict(), "steps": steps, "threads": threads,
                                             "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(name=f"bench_{workers}_{int(time.time())}", storage_path=str(storage),
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                              "OMP_NUM_THREADS": str(threads)}}),
    ).fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    seconds = max(r["seconds_per_step"] for r in ranks)  # a step ends when the slowest worker ends it
    measured = {"workers": workers, "threads_per_worker": threads, "seconds_per_step": seconds,
                "samples_per_second": config.train.batch_size / seconds, "steps_per_epoch": ranks[0]["steps_per_epoch"],
                "peak_rss_mib_per_worker": [r["peak_rss_mib"] for r in ranks]}
    if "plain_seconds_per_step_same_worker" in ranks[0]:
        measured["plain_samples_per_second_same_worker"] = (config.train.batch_size
                                                            / ranks[0]["plain_seconds_per_step_same_worker"])
    return measured


def run_plain(config, steps: int) -> dict:
    model, batches, steps_per_epoch = prepare(config)
    seconds = statistics.median(timed_steps(plain_step(model, config), batches, steps))
    return {"workers": 1, "loop": "plain torch", "seconds_per_step": seconds,
            "samples_per_second": config.train.batch_size / seconds, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="results/benchmark_train.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=args.cpus, object_store_memory=256 * 1024**2,
             include_dashboard=True)  # local on purpose: a benchmark owns its machine
    storage = (out.parent / "ray_benchmarks").resolve()
    torch.set_num_threads(args.cpus)
    plain = run_plain(config, args.steps)
    one, two = run_ray(config, 1, args.steps, args.cpus, storage), run_ray(config, 2, args.steps, args.cpus, storage)
    report = {
        "config": args.config, "overrides": args.overrides, "global_batch": config.train.batch_size,
        "cpus": args.cpus, "torch_threads_plain": args.cpus, "plain_torch_1_process": plain,
        "deepspeed_ray_1_worker": one, "deepspeed_ray_2_workers": two,
        "ratio_2_vs_1_workers": two["samples_per_second"] / one["samples_per_second"],
        "ratio_deepspeed_vs_plain": one["samples_per_second"] / plain["samples_per_second"],
        "ratio_deepspeed_vs_plain_same_worker": one["samples_per_second"] / one["plain_samples_per_second_same_worker"],
        "epoch_seconds_estimate": {f"{w['workers']}_workers": w["seconds_per_step"] * w["steps_per_epoch"]
                                   for w in (one, two)},
        "device": "cpu", "note": "median step time after 3 warm-up steps; text states cached when the preset says so",
    }
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
