"""Training pieces shared by every loop, and the plain one-process loop (`fit`).

`fit(config)` trains without Ray: fit split in, model directory + metrics.json + curves out. The
Ray Train + DeepSpeed job (tmr/distributed.py) uses the same optimiser, schedule, critic update and
evaluation, so the two differ only in who owns the process group and the optimiser step.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from tmr.atomic import atomic_file
from tmr.config import RunConfig, TrainConfig, dump_config
from tmr.data import PairCollator, Splits, load_splits, resolve_data_root
from tmr.losses import AlignmentLoss, Discriminator, critic_loss
from tmr.metrics import pool_metrics, retrieval_metrics
from tmr.model import ModalityBatchNorm, TMRModel, create_model

log = logging.getLogger("tmr.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Make glibc keep the memory a training step frees for the next step, instead of handing it back
    to the kernel and faulting it in again. Every step allocates and frees the same 1-30 MB
    activations; by default glibc returns freed blocks over its (dynamic) thresholds with munmap or a
    heap trim, and a `cpu` step spent ~20% of its CPU time in the kernel on the page faults. Blocks
    under 32 MiB (M_MMAP_THRESHOLD's maximum) now come from the heap, which keeps up to 1 GiB free
    (M_TRIM_THRESHOLD) and grows by 256 MiB at a time (M_TOP_PAD). Measured in the Ray worker of the
    main job: an epoch 135 -> 98 s (docs/training.md). False (and nothing done) where libc is not glibc."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # malloc.h
    return all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20)))


def parameter_groups(model: TMRModel, train: TrainConfig) -> list[dict]:
    """Text backbone at text_lr, everything else at lr; frozen parameters left out."""
    backbone = {id(p) for p in model.text_encoder.backbone.parameters()}
    text = [p for p in model.parameters() if p.requires_grad and id(p) in backbone]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone]
    groups = [{"params": rest, "lr": train.lr, "weight_decay": train.weight_decay}]
    if text:
        groups.append({"params": text, "lr": train.text_lr, "weight_decay": train.weight_decay})
    return groups


def make_optimizer(model: TMRModel, train: TrainConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser (Adam or AdamW over `parameter_groups`) and its per-step schedule, for every loop."""
    groups = parameter_groups(model, train)
    if train.optimizer == "adam":
        optimizer = torch.optim.Adam(groups)
    elif train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups)
    else:
        raise ValueError(f"unknown optimizer {train.optimizer!r}; use 'adam' or 'adamw'")
    if train.schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(train.warmup_steps, total_steps))
    elif train.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                        total_steps=max(1, total_steps))
    else:
        raise ValueError(f"unknown schedule {train.schedule!r}; use 'linear' or 'onecycle'")
    return optimizer, scheduler


def warmup_linear(warmup_steps: int, total_steps: int):
    """LambdaLR factor: linear warm-up, then linear decay to zero at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def make_loader(dataset: Dataset, collator: PairCollator, batch_size: int, shuffle: bool, seed: int,
                rank: int = 0, world_size: int = 1) -> DataLoader:
    """Each worker gets batch_size // world_size rows of every global batch (equal shards, last one dropped)."""
    if batch_size % world_size:
        raise ValueError(f"global batch {batch_size} does not split evenly over {world_size} workers")
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler, collate_fn=collator,
                      drop_last=shuffle)


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average gradients over workers (for the critic, which lives outside the DeepSpeed engine)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def critic_update(discriminator: Discriminator, optimizer: torch.optim.Optimizer, outputs: dict,
                  penalty_weight: float) -> dict[str, float]:
    """One WGAN-GP critic step on detached pooled features (texts real, molecules fake)."""
    optimizer.zero_grad(set_to_none=True)
    terms = critic_loss(discriminator, outputs["text_pooled"].float(), outputs["molecule_pooled"].float(),
                        penalty_weight)
    terms["critic"].backward()
    all_reduce_gradients(discriminator)
    optimizer.step()
    return {k: v.item() for k, v in terms.items()}


def make_collator(model: TMRModel, config: RunConfig, splits: Splits, progress: bool = True) -> PairCollator:
    """Tokenising collator; with train.cache_text_states, one that serves the frozen backbone's cached
    states (of every text of the pool: validation and the final evaluation read them too)."""
    states = text_states(model, config, splits, progress) if config.train.cache_text_states else None
    return PairCollator(model.tokenizer, config.model.text.max_length, states)


def text_states(model: TMRModel, config: RunConfig, splits: Splits, progress: bool = True,
                load: bool = True) -> dict[str, torch.Tensor] | None:
    """The frozen backbone's cached states of every text a run reads (fit, validation, final evaluation);
    `load=False` only makes sure they are on disk (see cached_backbone_states)."""
    texts = [text for d in splits.pool + splits.fit_sources for text in d.texts]
    return cached_backbone_states(model, texts, config.model.text.max_length, progress,
                                  states_in_bf16(config.train.text_states_precision, model.device), load=load)


def prepare_caches(config: RunConfig, progress: bool = True) -> None:
    """Fill what a run reads from tmr's cache before its first step: the ontology corpus, the featurised
    graphs and, with train.cache_text_states, the frozen backbone's states of every text.

    Why: a comparison or sweep runs one-CPU trials side by side; left to them, the first trial does this
    on one thread while the others wait on its lock (the text states alone: 30 minutes in fp32 on
    2026-12-03's 2-core machine). Called once in the driver, it runs on every core of the machine."""
    splits = load_splits(resolve_data_root(config.data), max_train_pairs=config.train.max_train_pairs,
                         seed=config.train.seed, corpus=config.corpus, progress=progress)
    if config.train.cache_text_states:
        text_states(create_model(config.model), config, splits, progress, load=False)


def states_in_bf16(precision: str, device: torch.device) -> bool:
    """Whether the frozen backbone's one-off run uses bf16: asked for, or "auto" on hardware that multiplies
    bf16 natively (AMX or AVX512-BF16 CPUs, CUDA). Elsewhere bf16 is emulated and slower than fp32.

    Why: on a fresh machine that run is the longest wait before the first step (29,613 texts: 15.5 minutes
    in fp32 on this project's 2-core AMX machine on 2026-12-03); in bf16 it takes half as long, and each
    token's state stays within cosine 0.9997 of fp32's (mean 0.99998; docs/training.md)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cached_backbone_states(model: TMRModel, texts: list[str], max_length: int, progress: bool = True,
                           bf16: bool = False, load: bool = True) -> dict[str, torch.Tensor] | None:
    """A frozen backbone's states of `texts`, kept on disk (~/.cache/tmr/text_states) across runs.

    Keyed by the texts, max_length, a fingerprint of the backbone's weights and the arithmetic (bf16
    or fp32), so a different model, text set or precision never reads a stale file; written atomically.
    `load=False`: compute and write them if missing, but do not read a file that is already there (the
    preset's is 1.9 GB) and return None; for a driver that fills the cache for its trials.
    """
    import hashlib

    import safetensors.torch

    from tmr.data.sources import CACHE

    unique = sorted(set(texts))
    digest = hashlib.sha256()
    for text in unique:
        digest.update(text.encode() + b"\0")
    weights = next(model.text_encoder.backbone.parameters())
    digest.update(f"{max_length}:{model.config.text.name}:{weights.double().sum().item():.10e}".encode())
    if bf16:  # fp32 files keep the key they had before bf16 was an option
        digest.update(b":bf16")
    path = CACHE / "text_states" / f"{digest.hexdigest()[:24]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):  # side-by-side trials on a fresh machine: one computes, the rest wait
        if not path.exists():
            engine, batch_size = None, 64
            if not bf16 and model.device.type == "cpu":  # fp32 on a CPU: ONNX Runtime's kernels, when installed
                from tmr.fast_text import BULK_BATCH, bulk_backbone

                engine = bulk_backbone(model, torch.get_num_threads())
                batch_size = BULK_BATCH if engine is not None else batch_size
            states = model.text_encoder.backbone_states(unique, max_length, batch_size, progress=progress, bf16=bf16,
                                                        engine=engine)
            with atomic_file(path) as partial:
                safetensors.torch.save_file({"states": torch.cat([states[t] for t in unique]),
                                             "lengths": torch.tensor([len(states[t]) for t in unique])}, partial)
            return states if load else None
    if not load:
        return None
    stored = safetensors.torch.load_file(path)
    return dict(zip(unique, torch.split(stored["states"], stored["lengths"].tolist())))


@torch.no_grad()
def recalibrate_norm(model: TMRModel, loader: DataLoader, max_batches: int) -> None:
    """Recompute the head's per-modality BatchNorm statistics under the current weights (PreciseBN).

    The cumulative average of batch statistics over up to `max_batches` training batches replaces
    the running averages, which lag a model that changed at every step. Everything else runs in
    eval mode; under Ray Train the statistics are global (ModalityBatchNorm all-reduces), so every
    worker ends with the same buffers. Every worker must pass the same number of batches.
    """
    norm = getattr(getattr(model, "head", None), "norm", None)
    if not isinstance(norm, ModalityBatchNorm) or max_batches <= 0:
        return
    was_training, momentum = model.training, norm.momentum
    model.eval()
    norm.train()
    norm.reset_running_stats()
    norm.momentum = None
    for step, batch in enumerate(loader):
        if step >= max_batches:
            break
        model(to_device(batch, model.device))
    norm.momentum = momentum
    model.train(was_training)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def embed_texts(model: TMRModel, texts: list[str], text_states: dict[str, torch.Tensor] | None = None,
                progress: bool = False) -> torch.Tensor:
    """Unit-norm embeddings of texts, in order (eval mode).

    With `text_states` (a frozen backbone's cached states, see PairCollator) the backbone is skipped:
    the same numbers up to the cache's fp16 rounding, without re-running the transformer every epoch.
    """
    if text_states is not None and all(t in text_states for t in texts):
        model.eval()
        collate = PairCollator(model.tokenizer, model.config.text.max_length, text_states)
        chunks = []
        for start in range(0, len(texts), 256):
            batch = to_device(collate.cached_states(texts[start:start + 256]), model.device)
            chunks.append(model.forward_text(None, batch["attention_mask"], batch["text_states"])[0].float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)
    return torch.cat([model.encode_text(texts[s:s + 256]) for s in
                      tqdm(range(0, len(texts), 256), desc="embedding texts", disable=not progress, leave=False)])


def embed_pairs(model: TMRModel, dataset: Dataset, progress: bool = False,
                text_states: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text, molecule) embeddings of every pair of a dataset, in order."""
    items = [dataset[i] for i in range(len(dataset))]
    return embed_texts(model, [item.text for item in items], text_states, progress), model.encode_graphs(items)


def evaluate(model: TMRModel, splits: Splits, which: str = "select", pools: tuple[str, ...] = ("split", "all"),
             progress: bool = False, text_states: dict[str, torch.Tensor] | None = None) -> dict:
    """Metrics of one split ("select" or "test") for each requested pool.

    "split": within the split's own pairs. "all": Text2Mol's protocol, each text against every
    molecule of `splits.candidates` (molecules.tsv, 33,010 for ChEBI-20) or, without that file,
    of every split present; each molecule against every text present.
    """
    dataset, positions, candidate_gold = splits.queries(which)
    text, molecule = embed_pairs(model, dataset, progress, text_states)
    out = {}
    if "split" in pools:
        out["split"] = retrieval_metrics(text, molecule)
    if "all" in pools:
        all_text = torch.cat([embed_texts(model, d.texts, text_states, progress) for d in splits.pool])
        if splits.candidates is not None:
            all_molecules = model.encode_graphs(splits.candidates, progress=progress)
        else:
            all_molecules, candidate_gold = torch.cat([model.encode_graphs(d) for d in splits.pool]), positions
        out["all"] = pool_metrics(text, molecule, all_text, positions, all_molecules, candidate_gold)
    return {"data": splits.label, "split": which, **out}


@torch.no_grad()
def class_query_metrics(model: TMRModel, splits: Splits, ontology_root: str | Path, k: int = 10) -> dict:
    """Precision@k of short class queries ("a steroid") over the select molecules, members by ChEBI's
    ontology (tmr.data.ontology.class_queries); chance is each class's share of the pool."""
    from tmr.data.dataset import _dataset_ids
    from tmr.data.ontology import Ontology, class_queries

    dataset, _, _ = splits.queries("select")
    queries = class_queries(Ontology(ontology_root), _dataset_ids(dataset))
    if not queries:
        return {"classes": 0}
    molecules = model.encode_graphs([dataset[i] for i in range(len(dataset))])
    texts = embed_texts(model, [q["query"] for q in queries])
    top = (texts @ molecules.T).topk(min(k, len(dataset)), dim=1).indices
    rows = []
    for query, hits in zip(queries, top.tolist()):
        members = set(query["members"])
        rows.append({"query": query["query"], "members": len(members),
                     "precision": 100 * sum(h in members for h in hits) / len(hits),
                     "chance": 100 * len(members) / len(dataset)})
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    return {"classes": len(rows), "pool": len(dataset), f"precision@{k}": mean("precision"), "chance": mean("chance"),
            "per_class": rows}


def final_class_queries(model: TMRModel, splits: Splits, config: RunConfig) -> dict | None:
    """class_query_metrics when the ChEBI ontology is at hand (never downloaded for this); else None."""
    from tmr.data.ontology import resolve_ontology_root

    try:
        root = resolve_ontology_root(config.corpus.ontology_path, config.data, download=False)
    except FileNotFoundError:
        log.info("no ChEBI ontology at hand: class queries not scored")
        return None
    return class_query_metrics(model, splits, root)


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label in (("val_mrr_t2m", "text→molecule"), ("val_mrr_m2t", "molecule→text")):
        right.plot(epochs, [h[key] for h in history], marker="o", label=label)
    right.set(xlabel="epoch", ylabel="MRR (%)", title="validation MRR (split pool)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epoch_pools(train: TrainConfig, epoch: int) -> tuple[str, ...]:
    """Every epoch: the split pool (model selection). Every pool_all_every epochs and the last: the full pool too."""
    every = train.pool_all_every
    return ("split", "all") if every and (epoch % every == 0 or epoch == train.epochs) else ("split",)


def epoch_record(epoch: int, losses: list[float], metrics: dict, seconds: float) -> dict:
    """One row of the history: the loss and validation MRR (split pool; full pool when it was measured)."""
    split = metrics["split"]
    record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else math.nan, "seconds": seconds,
              "val_mrr_t2m": split["text_to_molecule"]["mrr"], "val_mrr_m2t": split["molecule_to_text"]["mrr"],
              "val_mrr": (split["text_to_molecule"]["mrr"] + split["molecule_to_text"]["mrr"]) / 2}
    if "all" in metrics:
        full = metrics["all"]
        record.update(val_all_mrr_t2m=full["text_to_molecule"]["mrr"], val_all_mrr_m2t=full["molecule_to_text"]["mrr"],
                      val_all_hits1_t2m=full["text_to_molecule"]["hits@1"],
                      val_all_pool_t2m=full["text_to_molecule"]["pool"])
    return record


def fit(config: RunConfig, progress: bool = True, on_epoch=None, final_pools: tuple[str, ...] = ("split", "all")
        ) -> dict:
    """Plain one-process training: returns (and writes) the run's metrics; best model in output/best.

    `on_epoch(record, improved)` is called after every epoch (Ray Tune trials report through it);
    `final_pools` are the pools the best model is scored on at the end (sweeps score the winner's once).
    """
    train = config.train
    seed_everything(train.seed)
    keep_freed_memory()
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.json")
    splits = load_splits(resolve_data_root(config.data), max_train_pairs=train.max_train_pairs, seed=train.seed,
                         corpus=config.corpus, progress=progress)
    model = create_model(config.model)
    model.training_data = splits.corpora
    model.logit_scale.requires_grad_(config.loss.first_order in ("infonce", "both"))
    criterion = AlignmentLoss(config.loss)
    discriminator = Discriminator(config.model.embed_dim)
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=config.loss.discriminator_lr, betas=(0.5, 0.9))
    collator = make_collator(model, config, splits, progress)
    loader = make_loader(splits.fit, collator, train.batch_size, shuffle=True, seed=train.seed)
    optimizer, scheduler = make_optimizer(model, train, train.epochs * len(loader))
    history, best = [], -1.0
    for epoch in range(1, train.epochs + 1):
        started, losses = time.time(), []
        loader.sampler.set_epoch(epoch)
        model.train()
        for batch in tqdm(loader, desc=f"epoch {epoch}/{train.epochs}", disable=not progress, leave=False):
            outputs = model(batch)
            terms = criterion(outputs, discriminator, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if train.gradient_clipping > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.gradient_clipping)
            optimizer.step()
            scheduler.step()
            if config.loss.adversarial_weight > 0:
                critic_update(discriminator, d_opt, outputs, config.loss.gradient_penalty_weight)
            losses.append(terms["loss"].item())
        recalibrate_norm(model, loader, train.recalibrate_batches)
        metrics = evaluate(model, splits, pools=epoch_pools(train, epoch), text_states=collator.text_states)
        record = epoch_record(epoch, losses, metrics, time.time() - started)
        history.append(record)
        log.info("epoch %d: loss %.4f, val MRR t2m %.2f m2t %.2f", epoch, record["train_loss"],
                 record["val_mrr_t2m"], record["val_mrr_m2t"])
        improved = record["val_mrr"] > best
        if improved:
            best = record["val_mrr"]
            model.save_pretrained(out / "best")
        if on_epoch is not None:
            on_epoch(record, improved)
    best_model = TMRModel.from_pretrained(out / "best")
    result = {"history": history, "best_epoch": max(history, key=lambda h: h["val_mrr"])["epoch"],
              "corpora": splits.corpora, "validation": evaluate(best_model, splits, pools=final_pools, progress=progress,
                                     text_states=collator.text_states)}
    if "all" in final_pools:  # the final scoring (sweep trials score the winner alone)
        result["validation"]["class_queries"] = final_class_queries(best_model, splits, config)
    if splits.test is not None:
        result["test"] = evaluate(best_model, splits, "test", pools=final_pools, progress=progress,
                                  text_states=collator.text_states)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    plot_history(history, out / "curves.png")
    return result
