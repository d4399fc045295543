"""Ray Train + DeepSpeed: data-parallel training whose losses span the global batch.

    train_with_ray(config)           # driver: starts the TorchTrainer, then exports the best model
      └ train_loop_per_worker(...)   # every worker: a DeepSpeed engine around the TMR model

Each worker holds batch_size / num_workers rows of every global batch; the losses gather the other
workers' features with autograd (tmr.losses), and DeepSpeed averages gradients, so a step equals
the one-process step on the whole global batch. CPU: DeepSpeed's `cpu` accelerator over gloo; GPU:
nccl, optional bf16 and ZeRO.

The WGAN critic stays outside DeepSpeed, in fp32, with its own Adam and all-reduced gradients: it
is tiny (0.3M parameters), its gradient penalty needs a double backward through inputs, which
ZeRO's gradient hooks are not built for, and a second engine would buy nothing but a second
process-group bookkeeping. Its state goes into the same checkpoint.

Checkpoints: every epoch, the DeepSpeed engine state (all ranks), the critic, the history and a
self-contained model directory (`model/`, rank 0) are reported to Ray Train. A failed worker
restarts the group from the latest checkpoint (FailureConfig), random generators included, so the
resumed run trains as the uninterrupted one would have; running again with the same output
directory resumes a stopped run (Ray Train restores the run from its storage path).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tmr.atomic import atomic_directory
from tmr.config import RunConfig, config_from_dict, dump_config

log = logging.getLogger("tmr.distributed")
STATE_TAG = "state"  # DeepSpeed checkpoint tag inside every Ray checkpoint


def init_ray(num_cpus: int | None = None, object_store_mib: int = 512, dashboard: bool = True) -> None:
    """Join the cluster a `ray job submit` runs in ($RAY_ADDRESS), else start a local Ray with explicit
    CPUs and a modest object store. The dashboard stays on for training: it serves the state API
    that Ray Train's controller polls; an index build turns it off (its processes took ~10% of a
    core from the embedding actors on 2 cores)."""
    import ray

    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_mib * 1024**2,
                 include_dashboard=dashboard)


def deepspeed_config(config: RunConfig, world_size: int, use_gpu: bool) -> dict:
    train = config.train
    return {
        "train_micro_batch_size_per_gpu": train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,  # the client Adam with two learning-rate groups
        # explicit: DeepSpeed's default is 1.0, which would make this loop clip where the plain one does not
        "gradient_clipping": train.gradient_clipping,
        "bf16": {"enabled": bool(train.bf16 and use_gpu)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_engine(model, config: RunConfig, steps_per_epoch: int, world_size: int, use_gpu: bool):
    """(engine, critic, critic optimiser) on this worker; DeepSpeed owns the model's optimiser step."""
    import deepspeed

    from tmr.losses import Discriminator
    from tmr.train import make_optimizer

    model.logit_scale.requires_grad_(config.loss.first_order in ("infonce", "both"))
    optimizer, scheduler = make_optimizer(model, config.train, config.train.epochs * steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, world_size, use_gpu),
                                           dist_init_required=False)
    critic = Discriminator(config.model.embed_dim).to(engine.device)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=config.loss.discriminator_lr, betas=(0.5, 0.9))
    return engine, critic, critic_optimizer


def engine_backward(engine, loss: torch.Tensor, world_size: int) -> None:
    """DeepSpeed's backward. With one worker there is nothing to all-reduce, yet DeepSpeed still
    flattens every gradient, runs the collective and copies them back (measured: ~3% of a CPU
    step); its own `no_sync` skips that (not with ZeRO 2/3, which partition gradients there)."""
    if world_size == 1 and not engine.zero_optimization_partition_gradients():
        with engine.no_sync():
            engine.backward(loss)
    else:
        engine.backward(loss)


def once_per_node(local_rank: int, build):
    """`build()` on local rank 0 first, then on the others, which read the disk cache it filled:
    featurised graphs and cached text states are computed and written once per node, not per worker."""
    if local_rank == 0:
        value = build()
    dist.barrier()
    if local_rank != 0:
        value = build()
    return value


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train worker: train `loop_config["run"]` for its epochs, reporting every epoch."""
    import ray.train

    from tmr.data import load_splits, resolve_data_root
    from tmr.losses import AlignmentLoss
    from tmr.model import create_model
    from tmr.train import (critic_update, epoch_pools, epoch_record, evaluate, keep_freed_memory, make_collator,
                           make_loader, recalibrate_norm, seed_everything, to_device)

    config = config_from_dict(loop_config["run"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    use_gpu = torch.cuda.is_available() and config.train.use_gpu
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))
    seed_everything(config.train.seed)
    keep_freed_memory()
    local_rank = context.get_local_rank()
    splits = once_per_node(local_rank, lambda: load_splits(resolve_data_root(config.data),
                                                            max_train_pairs=config.train.max_train_pairs,
                                                            seed=config.train.seed, corpus=config.corpus,
                                                            progress=rank == 0))
    model = create_model(config.model)
    model.training_data = splits.corpora
    collator = once_per_node(local_rank, lambda: make_collator(model, config, splits, progress=rank == 0))
    loader = make_loader(splits.fit, collator, config.train.batch_size, shuffle=True, seed=config.train.seed,
                         rank=rank, world_size=world_size)
    engine, critic, critic_optimizer = build_engine(model, config, len(loader), world_size, use_gpu)
    criterion = AlignmentLoss(config.loss)

    start_epoch, history = 1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=STATE_TAG)
            critic_state = torch.load(Path(directory) / "critic.pt", map_location=engine.device, weights_only=True)
            critic.load_state_dict(critic_state["critic"])
            critic_optimizer.load_state_dict(critic_state["optimizer"])
            start_epoch, history = client_state["epoch"] + 1, client_state["history"]
            restore_random_state(Path(directory) / f"random_rank{rank}.pt")
        if rank == 0:
            log.info("resumed from the checkpoint of epoch %d", start_epoch - 1)

    crash_at = loop_config.get("crash_once_at_epoch")  # fault drill: see tests/test_ray_train.py
    for epoch in range(start_epoch, config.train.epochs + 1):
        started, losses = time.time(), []
        loader.sampler.set_epoch(epoch)
        engine.train()
        for step, batch in enumerate(loader):
            drill = crash_at == epoch and step == 1 and rank == world_size - 1
            if drill and not Path(loop_config["crash_marker"]).exists():
                Path(loop_config["crash_marker"]).touch()
                kill_this_worker(f"fault drill: SIGKILL to worker {rank} in epoch {epoch}, step {step}")
            outputs = {k: v.float() for k, v in engine(to_device(batch, engine.device)).items()}
            terms = criterion(outputs, critic, engine.module.logit_scale)
            engine_backward(engine, terms["loss"], world_size)
            engine.step()
            if config.loss.adversarial_weight > 0:
                critic_update(critic, critic_optimizer, outputs, config.loss.gradient_penalty_weight)
            losses.append(terms["loss"].item())
            if rank == 0 and config.train.log_every and step % config.train.log_every == 0:
                log.info("epoch %d step %d/%d: %s", epoch, step, len(loader),
                         " ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))
        recalibrate_norm(engine.module, loader, config.train.recalibrate_batches)
        mean_loss = torch.tensor(sum(losses) / max(1, len(losses)), device=engine.device)
        dist.all_reduce(mean_loss)
        train_seconds = time.time() - started
        if rank == 0:
            metrics = evaluate(engine.module, splits, pools=epoch_pools(config.train, epoch),
                               text_states=collator.text_states)
            record = epoch_record(epoch, [mean_loss.item() / world_size], metrics, time.time() - started)
            record["train_seconds"] = train_seconds
            record["resumed_from_epoch"] = start_epoch - 1  # 0: this attempt started from scratch
            record["samples_per_second"] = len(loader) * config.train.batch_size / train_seconds
            history.append(record)
            log.info("epoch %d: loss %.4f, val MRR t2m %.2f m2t %.2f (%.0fs)", epoch, record["train_loss"],
                     record["val_mrr_t2m"], record["val_mrr_m2t"], record["seconds"])
        report_checkpoint(engine, critic, critic_optimizer, epoch, history, rank)
    dist.barrier()


def random_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(path: Path) -> None:
    """This rank's generators as they were after the checkpoint's epoch: a resumed run then draws the
    same token dropout and gradient-penalty mixes as one that never stopped, and ends with equal weights."""
    if not path.exists():  # a checkpoint from before random states were saved: resume with fresh draws
        return
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def kill_this_worker(reason: str, timeout_s: float = 120.0) -> None:
    """The fault drill (tests/test_ray_train.py): SIGKILL this worker's process mid-epoch, as a crash
    would. Step 0's collectives made every rank finish the previous epoch's report; the controller
    takes a worker's report when it next polls it (every 2 s), and a process killed with its report
    still queued would take that checkpoint with it, so the drill waits until its report is taken."""
    try:  # Ray Train's per-worker report queue (internal; without it, a few poll intervals)
        from ray.train.v2._internal.execution.context import get_train_context

        pending = get_train_context().get_result_queue()
    except (ImportError, AttributeError, RuntimeError):
        pending = None
    deadline = time.time() + (timeout_s if pending is not None else 10.0)
    while time.time() < deadline and (pending is None or not pending.empty()):
        time.sleep(0.1)
    log.warning(reason)
    os.kill(os.getpid(), signal.SIGKILL)


def report_checkpoint(engine, critic, critic_optimizer, epoch: int, history: list[dict], rank: int) -> None:
    """Every rank writes its DeepSpeed shards and its random generators; rank 0 adds the critic, the
    history and `model/`."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=STATE_TAG, client_state={"epoch": epoch, "history": history})
        torch.save(random_state(), Path(directory) / f"random_rank{rank}.pt")
        if rank == 0:
            torch.save({"critic": critic.state_dict(), "optimizer": critic_optimizer.state_dict()},
                       Path(directory) / "critic.pt")
            engine.module.save_pretrained(Path(directory) / "model")
            (Path(directory) / "history.json").write_text(json.dumps(history, indent=2))
        metrics = dict(history[-1]) if rank == 0 else {}
        metrics["epoch"] = epoch
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


def evaluate_model(model_dir: str, config: RunConfig | dict) -> dict:
    """Validation (both pools) and, when present, test metrics of an exported model directory."""
    from tmr.data import load_splits, resolve_data_root
    from tmr.model import from_pretrained
    from tmr.train import evaluate, final_class_queries, make_collator

    config = config_from_dict(config) if isinstance(config, dict) else config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(model_dir).to(device)
    splits = load_splits(resolve_data_root(config.data), max_train_pairs=config.train.max_train_pairs,
                         seed=config.train.seed, corpus=config.corpus, progress=False)
    states = make_collator(model, config, splits, progress=False).text_states  # on disk since training (same texts)
    result = {"validation": evaluate(model, splits, text_states=states)}
    result["validation"]["class_queries"] = final_class_queries(model, splits, config)
    if splits.test is not None:
        result["test"] = evaluate(model, splits, "test", text_states=states)
    return result


def train_with_ray(config: RunConfig, threads_per_worker: int | None = None, crash_once_at_epoch: int | None = None,
                   max_failures: int = 3) -> dict:
    """Driver: run the TorchTrainer, export the best epoch to output/best, write metrics.json and curves.png."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tmr.data import load_splits
    from tmr.data.sources import resolve_run_inputs
    from tmr.train import plot_history

    out = Path(config.output).resolve()
    # Every input resolved here, once, to absolute paths (a `ray job submit` worker runs in a copy of the
    # code that has no ../shared beside it); a missing file fails now, naming its fix, not in the workers.
    resolve_run_inputs(config)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.json")
    # featurised graphs, the derived corpus and the held-out check: built once here, read by the workers
    splits = load_splits(config.data, max_train_pairs=config.train.max_train_pairs, seed=config.train.seed,
                         corpus=config.corpus)
    train = config.train
    if threads_per_worker is None:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else (os.cpu_count() or 1)
        threads_per_worker = max(1, cpus // train.num_workers)
    env = {"DS_ACCELERATOR": "cuda" if train.use_gpu else "cpu", "OMP_NUM_THREADS": str(threads_per_worker)}
    loop_config = {"run": config.to_dict(), "threads_per_worker": threads_per_worker}
    if crash_once_at_epoch is not None:
        loop_config.update(crash_once_at_epoch=crash_once_at_epoch, crash_marker=str(out / ".crash_drill_done"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": threads_per_worker}),
        run_config=RayRunConfig(
            name="ray_train", storage_path=str(out),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_mrr",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": env},
        ),
    )
    result = trainer.fit()
    best_checkpoint = result.get_best_checkpoint("val_mrr", "max")
    with result.checkpoint.as_directory() as directory:  # the latest one holds the whole history
        history = json.loads((Path(directory) / "history.json").read_text())
    with best_checkpoint.as_directory() as directory, atomic_directory(out / "best") as staging:
        shutil.copytree(Path(directory) / "model", staging, dirs_exist_ok=True)
    # the final scoring runs alone once training is over: with the CPUs one training worker had (2 threads on a
    # 2-core machine, where one left the other core idle: 45 s of a fresh main job)
    evaluate_remote = ray.remote(num_cpus=threads_per_worker, num_gpus=1 if train.use_gpu else 0)(evaluate_model)
    final = ray.get(evaluate_remote.remote(str(out / "best"), config.to_dict()))
    metrics = {"history": history, "best_epoch": max(history, key=lambda h: h["val_mrr"])["epoch"],
               "num_workers": train.num_workers, "corpora": splits.corpora, **final}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_history(history, out / "curves.png")
    return metrics
