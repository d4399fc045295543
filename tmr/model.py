"""The Song et al. 2024 model: text encoder, molecule encoder, memory-bank projector, shared head.

    text  -> AutoModel token states -> Linear + LayerNorm -> token features ┐
                                                                             ├ memory bank (K shared
    SMILES-> graph -> GNN node states -> MLP + LayerNorm -> node features ──┘ queries, one cross-
                                                                               attention) -> mean of
                                                                               K slots -> shared head
                                                                               -> unit-norm embedding
The encoders live in tmr/encoders.py; this file owns what both modalities share (the memory
bank and the head) and the model around them. One `create_model(config)`; `save_pretrained(dir)` /
`from_pretrained(dir)` write and read a self-contained directory (config.json, model.safetensors,
text_encoder/ config and tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch

from tmr.atomic import atomic_directory
from tmr.config import ModelConfig, config_from_dict
from tmr.data.featurize import featurize
from tmr.encoders import Mol2vecTable, MoleculeEncoder, TextEncoder, resolve_text_model  # noqa: F401 (re-exported)


def segment_mean(features: torch.Tensor, segment: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of the rows of each segment (text or molecule): (N, D), (N,) -> (size, D)."""
    total = features.new_zeros(size, features.shape[-1]).index_add(0, segment, features)
    count = torch.bincount(segment, minlength=size).clamp(min=1).to(features.dtype)
    return total / count.unsqueeze(-1)


def segment_weighted_sum(weights: torch.Tensor, rows: torch.Tensor, segment: torch.Tensor, size: int,
                         features: torch.Tensor) -> torch.Tensor:
    """sum over each segment's packed elements n of weights[n, j] * features[rows[n]], for every column j:
    (N, J), (N,), (N,) sorted, size, (C, D) -> (size, J, D). One sparse (size x C) product per column,
    so no (N, J, D) tensor is built (a tenth of the time of gathering and scattering on CPU)."""
    if len(segment) > 1 and bool((segment[1:] < segment[:-1]).any()):
        raise ValueError("segments must be sorted (PyG batches are)")
    crow = torch.zeros(size + 1, dtype=torch.long, device=segment.device)
    crow[1:] = torch.cumsum(torch.bincount(segment, minlength=size), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all this uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.stack([torch.sparse_csr_tensor(crow, rows, column.contiguous(), (size, len(features))) @ features
                            for column in weights.unbind(1)], 1)


def drop_tokens(attention_mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Token dropout: hide a random `rate` of each text's tokens (the first, [CLS], always stays).

    A frozen, cached text backbone shows the model the very same states for a description every
    epoch, and on 2,801 pairs it ranks its fit pairs far better than held-out ones (MRR 93 vs 62);
    with tokens dropped, each epoch shows a different part of every description, and held-out MRR
    rises (README, "Results")."""
    keep = torch.rand(attention_mask.shape, device=attention_mask.device) >= rate
    keep[:, 0] = True
    return attention_mask * keep


class MemoryBankProjector(nn.Module):
    """K learnable memory vectors, the queries of one multi-head cross-attention shared by both modalities.

    No residual and no FFN: the output lives in the span the memory attends to, which is what
    makes it modality-shared. Output: the mean of the K slots. K = 0 falls back to mean pooling
    (the ablation).

    The maths of nn.MultiheadAttention(memory, features, features) with a padding mask, followed
    by the mean over the slots (tested equal), computed on packed rows (tokens or atoms, each with
    its segment: its text or molecule) without padding. Two identities make it cheap: the output
    projection is linear, so it applies to the mean of the slots; and the mean of the slots is
    sum_n w_n v_n with w_n the attention of token n averaged over the K memory queries, so no
    (segment, K, length) tensor is ever built.
    """

    def __init__(self, dim: int, memory_size: int, num_heads: int):
        super().__init__()
        self.memory_size, self.num_heads = memory_size, num_heads
        if memory_size > 0:
            if dim % num_heads:
                raise ValueError(f"embedding size {dim} is not divisible by {num_heads} heads")
            self.memory = nn.Parameter(torch.randn(memory_size, dim) * dim**-0.5)
            self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, features: torch.Tensor, segment: torch.Tensor, size: int, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(N, D) packed features, (N,) segment of each row, number of segments -> (size, D).
        With `rows` (inference only), the packed features are `features[rows]`: distinct rows, each
        scored once.

        The key and value projections are folded out of the per-row work. Scores are linear in the
        features, so keys . queries = features @ (W_k^T queries) + b_k . queries; and each head's
        weights sum to 1 over its segment, so the weighted sum of values is W_v (weighted sum of
        features) + b_v. Per row that leaves one (D, heads*K) product instead of two (D, D)
        projections (training steps of the `cpu` preset ~1.15x faster, docs/training.md), and the
        maths stays nn.MultiheadAttention's (tests/test_model.py: outputs and gradients)."""
        if rows is not None and (self.memory_size == 0 or torch.is_grad_enabled()):
            features, rows = features[rows], None  # distinct rows are scored once only without autograd
        if self.memory_size == 0:
            return segment_mean(features, segment, size)
        from torch_geometric.utils import softmax

        dim, heads, memory = features.shape[-1], self.num_heads, self.memory_size
        per_head = dim // heads
        queries = self.query(self.memory).view(memory, heads, per_head)  # (K, h, d/h)
        key_weight = self.key.weight.view(heads, per_head, dim)  # head h's rows of W_k
        scale = per_head**-0.5  # folded into the (D, heads*K) product rather than applied per row
        score_weight = torch.einsum("hdi,khd->ihk", key_weight, queries).reshape(dim, heads * memory) * scale
        score_bias = torch.einsum("hd,khd->hk", self.key.bias.view(heads, per_head), queries).reshape(-1) * scale
        scores = torch.addmm(score_bias, features, score_weight)
        scores = (scores if rows is None else scores[rows]).view(-1, heads, memory)
        weights = softmax(scores, segment, num_nodes=size, dim=0).mean(-1)  # (N, h)
        if rows is None:
            pooled = features.new_zeros(size, heads, dim).index_add(0, segment, weights.unsqueeze(-1) * features.unsqueeze(1))
        else:
            pooled = segment_weighted_sum(weights, rows, segment, size, features)
        value_weight = self.value.weight.view(heads, per_head, dim)
        values = torch.einsum("shi,hdi->shd", pooled, value_weight) + self.value.bias.view(heads, per_head)
        return self.out(values.reshape(size, dim))


TEXT, MOLECULE = 0, 1  # modality index of the shared head's normalisation statistics


class ModalityBatchNorm(nn.Module):
    """BatchNorm1d with one set of statistics per modality and one shared affine transform.

    Why per modality: in training, texts and molecules go through the shared head in separate
    calls, so a BatchNorm normalises each modality by its own batch statistics, which removes the
    offset between the two modalities' features. A single set of running statistics would be a
    blend of both in eval mode and bring that offset back (measured: held-out MRR 23.5 -> 8.9).
    Keeping one running mean/variance per modality makes inference normalise exactly as training
    did, and keeps the paper's head (Linear + BatchNorm + Tanh) unchanged in training.

    Running averages lag a model that changes every step (measured on a tiny run: eval-mode MRR
    19.9 vs 23.5 with each modality's own batch statistics), so the training loops recompute
    them before every evaluation and checkpoint: `tmr.train.recalibrate_norm`, PreciseBN's
    cumulative average of batch statistics over training batches under the current weights.

    Training statistics span the global batch across workers: torch's SyncBatchNorm refuses CPU
    tensors, so the sums are all-reduced with autograd on any backend, and a sharded batch
    normalises (and back-propagates) exactly as the whole batch would.
    """

    def __init__(self, dim: int, modalities: int = 2, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(modalities, dim))
        self.register_buffer("running_var", torch.ones(modalities, dim))
        self.register_buffer("num_batches_tracked", torch.zeros(modalities, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        if not self.training:
            mean, var = self.running_mean[modality], self.running_var[modality]
        else:
            count = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                from torch.distributed.nn.functional import all_reduce

                dist.all_reduce(count)
                with warnings.catch_warnings():  # deprecated in favour of a private API; the public one still works
                    warnings.simplefilter("ignore", FutureWarning)
                    mean = all_reduce(x.sum(0)) / count
                    var = all_reduce(((x - mean) ** 2).sum(0)) / count
            else:
                mean = x.sum(0) / count
                var = ((x - mean) ** 2).sum(0) / count
            with torch.no_grad():
                self.num_batches_tracked[modality] += 1
                # momentum None: the cumulative average of every batch since reset_running_stats()
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked[modality].item()
                self.running_mean[modality].lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var[modality].lerp_(unbiased.to(self.running_var.dtype), factor)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SharedHead(nn.Module):
    """The same head for both modalities: exp(s) scale, Linear, norm, Tanh, L2-normalise.

    norm="batch": the paper's BatchNorm with per-modality statistics (ModalityBatchNorm);
    norm="layer": LayerNorm, which needs no statistics at all.
    """

    def __init__(self, dim: int, norm: str, scale_init: float):
        super().__init__()
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        self.log_scale = nn.Parameter(torch.tensor([float(scale_init)]))
        self.linear = nn.Linear(dim, dim)
        if norm not in ("batch", "layer"):
            raise ValueError(f"unknown head norm {norm!r}; use 'batch' or 'layer'")
        self.norm = ModalityBatchNorm(dim) if norm == "batch" else nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, modality: int) -> torch.Tensor:
        h = self.linear(x * self.log_scale.exp())
        h = self.norm(h, modality) if isinstance(self.norm, ModalityBatchNorm) else self.norm(h)
        return F.normalize(torch.tanh(h), dim=-1)


class TMRModel(nn.Module):
    """architecture="memory_bank": the paper's model (module docstring).
    architecture="dual_encoder": the CLIP-style baseline: the text backbone's mean-pooled states
    through a 2-layer MLP, the molecule encoder's mean-pooled node features through a Linear;
    no memory bank, no shared head."""

    def __init__(self, config: ModelConfig, text_source: str | None = None, load_text_weights: bool = True,
                 mol2vec_vocab: int | None = None):
        super().__init__()
        self.config = config
        self.training_data: dict | None = None  # corpus name -> pairs; saved beside the weights
        d = config.embed_dim
        if config.architecture not in ("memory_bank", "dual_encoder"):
            raise ValueError(f"unknown architecture {config.architecture!r}; use 'memory_bank' or 'dual_encoder'")
        self.text_encoder = TextEncoder(config.text, d, text_source, load_text_weights)
        mol = config.molecule
        mol2vec = None
        if mol.kind == "gcn_mol2vec" or mol.mol2vec_features:
            if mol2vec_vocab is None:
                from tmr.data.sources import resolve_mol2vec

                mol2vec = Mol2vecTable(np.load(resolve_mol2vec(mol.mol2vec_path)))
            else:
                mol2vec = Mol2vecTable(vocab=mol2vec_vocab)
        self.molecule_encoder = MoleculeEncoder(mol.kind, mol.hidden_dim, mol.num_layers, d, mol2vec)
        if config.architecture == "memory_bank":
            self.projector = MemoryBankProjector(d, config.projector.memory_size, config.projector.num_heads)
            self.head = SharedHead(d, config.head_norm, config.scale_init)
        else:
            hidden = self.text_encoder.backbone.config.hidden_size
            self.text_head = nn.Sequential(nn.Linear(hidden, d), nn.ReLU(), nn.Linear(d, d))
            self.molecule_head = nn.Linear(d, d)
            self.text_encoder.proj.requires_grad_(False)  # token features feed only the memory bank
            self.text_encoder.norm.requires_grad_(False)
        # InfoNCE's learnable temperature (CLIP's logit scale); unused, and frozen, with the triplet loss.
        self.logit_scale = nn.Parameter(torch.tensor([float(np.log(1 / 0.07))]))

    @property
    def mol2vec_vocab(self) -> int | None:
        table = self.molecule_encoder.mol2vec
        return None if table is None else len(table.keys)

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def forward_text(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                     states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (unit-norm embedding, pooled features before the projector: what the critic sees)."""
        size = attention_mask.shape[0]
        if self.config.architecture == "dual_encoder":
            states = self.text_encoder.states(input_ids, attention_mask, states)
            weights = attention_mask.to(states.dtype).unsqueeze(-1)
            pooled = self.text_head((states * weights).sum(1) / weights.sum(1).clamp(min=1.0))  # sentence embedding
            return F.normalize(pooled, dim=-1), pooled
        tokens, segment = self.text_encoder(input_ids, attention_mask, states)
        return self.head(self.projector(tokens, segment, size), TEXT), segment_mean(tokens, segment, size)

    def forward_molecule(self, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        size = graphs.num_graphs
        if torch.is_grad_enabled():
            nodes, segment = self.molecule_encoder(graphs)
            rows = None
        else:  # inference: the GNN and the projector's scores once per distinct atom environment
            nodes, rows, segment = self.molecule_encoder.forward_distinct(graphs)
        if rows is None:
            mean = segment_mean(nodes, segment, size)
        else:
            count = torch.bincount(segment, minlength=size).clamp(min=1).to(nodes.dtype)
            mean = segment_weighted_sum((1 / count)[segment].unsqueeze(1), rows, segment, size, nodes)[:, 0]
        if self.config.architecture == "dual_encoder":
            pooled = self.molecule_head(mean)
            return F.normalize(pooled, dim=-1), pooled
        return self.head(self.projector(nodes, segment, size, rows), MOLECULE), mean

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        if self.training and self.config.text.token_dropout > 0:
            mask = drop_tokens(mask, self.config.text.token_dropout)
        text, text_pooled = self.forward_text(batch.get("input_ids"), mask, batch.get("text_states"))
        molecule, molecule_pooled = self.forward_molecule(batch["graphs"])
        return {"text": text, "molecule": molecule, "text_pooled": text_pooled, "molecule_pooled": molecule_pooled}

    # --- inference helpers -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def ensure_eval(self) -> None:
        """eval() when any module is still training. Why not eval() every call: it sets the flag on all
        ~190 modules, 0.95 ms per call on 2026-12-03's 2-core machine, a tenth of a short query's encode;
        reading the flags costs 0.27 ms."""
        if any(module.training for module in self.modules()):
            self.eval()

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 64, backbone=None) -> torch.Tensor:
        """Texts -> (N, D) unit-norm embeddings (eval mode). `backbone(input_ids, attention_mask)`, when
        given, computes the transformer's states instead of the model's own (tmr.fast_text's engine)."""
        self.ensure_eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
        out = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start:start + batch_size]]
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=self.config.text.max_length,
                                    return_tensors="pt").to(self.device)
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            states = backbone(ids, mask) if backbone is not None else None
            out.append(self.forward_text(ids, mask, states)[0].float().cpu())
        if not out:
            return torch.empty(0, self.config.embed_dim)
        embeddings = torch.cat(out)
        return embeddings[torch.argsort(torch.tensor(order))]

    @torch.no_grad()
    def encode_graphs(self, graphs, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """A list (or dataset) of featurised graphs -> (N, D) unit-norm embeddings (eval mode)."""
        from tqdm.auto import tqdm

        out = []
        for s in tqdm(range(0, len(graphs), batch_size), desc="embedding molecules", disable=not progress, leave=False):
            out.append(self.encode_batch(Batch.from_data_list([graphs[i] for i in range(s, min(s + batch_size, len(graphs)))])))
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_batch(self, graphs: Batch) -> torch.Tensor:
        """One PyG Batch of molecules -> (num_graphs, D) unit-norm embeddings (eval mode)."""
        self.ensure_eval()
        return self.forward_molecule(graphs.to(self.device))[0].float().cpu()

    def encode_molecule(self, smiles: list[str], batch_size: int = 256) -> torch.Tensor:
        """SMILES -> (N, D) unit-norm embeddings; raises InvalidMolecule naming the bad input."""
        return self.encode_graphs([featurize(s) for s in smiles], batch_size)

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors and text_encoder/ atomically (tmr.atomic)."""
        meta = {"tmr_model": dataclasses.asdict(self.config)}
        if self.mol2vec_vocab is not None:
            meta["mol2vec_vocab"] = self.mol2vec_vocab
        with atomic_directory(directory) as staging:
            (staging / "config.json").write_text(json.dumps(meta, indent=2))
            if getattr(self, "training_data", None):  # the corpora and pair counts it was fit on
                (staging / "training_data.json").write_text(json.dumps(self.training_data, indent=2))
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            safetensors.torch.save_file(state, staging / "model.safetensors")
            self.text_encoder.backbone.config.save_pretrained(staging / "text_encoder")
            self.tokenizer.save_pretrained(staging / "text_encoder")
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> TMRModel:
        directory = Path(directory)
        meta = json.loads((directory / "config.json").read_text())
        config = config_from_dict({"model": meta["tmr_model"]}).model
        model = cls(config, text_source=str(directory / "text_encoder"), load_text_weights=False,
                    mol2vec_vocab=meta.get("mol2vec_vocab"))
        state = safetensors.torch.load_file(directory / "model.safetensors", device=map_location)
        if state.get("head.norm.running_mean", torch.zeros(2, 1)).dim() == 1:
            raise ValueError(f"{directory} was saved by tmr < 0.2, whose head normalised texts and molecules with "
                             "blended statistics at inference (a train/eval mismatch); retrain it")
        model.load_state_dict(state)
        if (directory / "training_data.json").exists():
            model.training_data = json.loads((directory / "training_data.json").read_text())
        return model.eval()


def create_model(config: ModelConfig) -> TMRModel:
    return TMRModel(config)


def from_pretrained(directory: str | Path, map_location: str = "cpu") -> TMRModel:
    return TMRModel.from_pretrained(directory, map_location)
