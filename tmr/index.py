"""Retrieval indexes: a library of molecules (or texts) embedded by a trained model, searchable.

An index directory holds
    embeddings.npy     (N, D) float32 or float16, unit norm, row i = metadata row i
    metadata.parquet   id, smiles (canonical), inchikey, name, text
    index.faiss        faiss index (exact inner product, or HNSW for large libraries)
    manifest.json      kind, model fingerprint, count, dim, index type, recall@10 of HNSW, created
    skipped.json       rows not indexed, with their id and why
No pickle anywhere: numpy without objects, parquet, faiss' own format and JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmr.atomic import atomic_directory

log = logging.getLogger("tmr.index")


def model_fingerprint(model_dir: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class LibraryRows:
    ids: list[str]
    smiles: list[str]
    inchikeys: list[str]
    names: list[str]
    texts: list[str]
    skipped: list[tuple[str, str]]


def read_library(path: str | Path, kind: str = "molecule") -> LibraryRows:
    """Rows of a SMILES/TSV/CSV/SDF library, canonicalised; duplicates (same InChIKey) and
    unparsable rows reported in `skipped` and left out."""
    from rdkit import Chem

    from tmr.data.featurize import InvalidMolecule, parse_smiles
    from tmr.data.sources import read_pairs

    path = Path(path)
    if path.suffix.lower() == ".sdf":
        raw = []
        for i, mol in enumerate(Chem.SDMolSupplier(str(path))):
            name = mol.GetProp("_Name") if mol is not None and mol.HasProp("_Name") else ""
            raw.append((name or str(i), Chem.MolToSmiles(mol) if mol is not None else "", name, ""))
        skipped: list[tuple[str, str]] = []
    else:
        pairs, report = read_pairs(path, require_text=(kind == "text"))
        raw = [(p.id, p.smiles, getattr(p, "name", "") or "", p.text or "") for p in pairs]
        skipped = list(report.skipped)
    rows = LibraryRows([], [], [], [], [], skipped)
    seen: dict[str, str] = {}
    for identifier, smiles, name, text in raw:
        try:
            parsed = parse_smiles(smiles)
        except InvalidMolecule as error:
            rows.skipped.append((identifier, str(error)))
            continue
        inchikey = Chem.MolToInchiKey(parsed.mol) or ""
        if kind == "molecule" and inchikey and inchikey in seen:
            rows.skipped.append((identifier, f"duplicate of {seen[inchikey]} (InChIKey {inchikey})"))
            continue
        seen.setdefault(inchikey, identifier)
        rows.ids.append(identifier)
        rows.smiles.append(parsed.canonical_smiles)
        rows.inchikeys.append(inchikey)
        rows.names.append(name)
        rows.texts.append(text)
    if rows.skipped:
        log.warning("%s: %d row(s) skipped, e.g. %s", path.name, len(rows.skipped), rows.skipped[:5])
    return rows


def build_faiss(embeddings: np.ndarray, kind: str = "exact", hnsw_m: int = 32):
    import faiss

    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    if kind == "exact":
        index = faiss.IndexFlatIP(data.shape[1])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(data.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
    else:
        raise ValueError(f"unknown index type {kind!r}; use 'exact' or 'hnsw'")
    index.add(data)
    return index


def recall_at_10(index, embeddings: np.ndarray, queries: int = 1000, seed: int = 0) -> float:
    """Share of the exact top 10 that the (approximate) index returns, for library items as queries."""
    rng = np.random.default_rng(seed)
    picked = np.ascontiguousarray(embeddings[rng.choice(len(embeddings), min(queries, len(embeddings)), replace=False)],
                                  dtype=np.float32)
    exact = np.argsort(-(picked @ embeddings.astype(np.float32).T), axis=1)[:, :10]
    _, approx = index.search(picked, 10)
    return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))


def write_index(out: str | Path, embeddings: np.ndarray, rows: LibraryRows, kind: str, model_dir: str | Path,
                index_type: str = "exact", dtype: str = "float32") -> dict:
    """Write an index directory atomically; returns its manifest."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = build_faiss(embeddings, index_type)
    manifest = {"kind": kind, "model": str(Path(model_dir).resolve()), "model_fingerprint": model_fingerprint(model_dir),
                "count": int(len(embeddings)), "dim": int(embeddings.shape[1]), "index": index_type, "dtype": dtype,
                "skipped": len(rows.skipped), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if index_type != "exact":
        manifest["recall_at_10"] = recall_at_10(index, embeddings)
        log.info("%s index recall@10 against exact search: %.4f", index_type, manifest["recall_at_10"])
    with atomic_directory(out) as staging:
        np.save(staging / "embeddings.npy", embeddings.astype(dtype))
        pq.write_table(pa.table({"id": rows.ids, "smiles": rows.smiles, "inchikey": rows.inchikeys, "name": rows.names,
                                 "text": rows.texts}), staging / "metadata.parquet")
        faiss.write_index(index, str(staging / "index.faiss"))
        (staging / "skipped.json").write_text(json.dumps(rows.skipped))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class RetrievalIndex:
    """A loaded index directory, or one shard of it (rows shard::num_shards)."""

    def __init__(self, directory: str | Path, shard: int = 0, num_shards: int = 1):
        import faiss
        import pyarrow.parquet as pq

        directory = Path(directory)
        self.manifest = json.loads((directory / "manifest.json").read_text())
        metadata = pq.read_table(directory / "metadata.parquet").to_pydict()
        embeddings = np.load(directory / "embeddings.npy", allow_pickle=False).astype(np.float32)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} of {num_shards}")
        self.rows = np.arange(shard, len(embeddings), num_shards)  # global row numbers held here
        if num_shards == 1:
            self.index = faiss.read_index(str(directory / "index.faiss"))
        else:
            self.index = build_faiss(embeddings[self.rows], self.manifest["index"])
        self.metadata = {k: [v[i] for i in self.rows] for k, v in metadata.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (Q, min(k, len)), best first; cosine similarity of unit vectors."""
        k = min(k, len(self))
        scores, local = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, self.rows[local]

    def record(self, global_row: int) -> dict:
        position = int(np.searchsorted(self.rows, global_row))
        return {key: values[position] for key, values in self.metadata.items()}


def merge_top_k(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, rows) into the global top k, ties broken by row number."""
    scores = np.concatenate([s for s, _ in results], axis=1)
    rows = np.concatenate([r for _, r in results], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def embed_rows(model_dir: str | Path, rows: LibraryRows, kind: str, batch_size: int = 256, use_ray: bool = True,
               concurrency: int = 1) -> np.ndarray:
    """Embeddings of the rows, with Ray Data `map_batches` (a progress bar per stage) or in-process."""
    column = "smiles" if kind == "molecule" else "text"
    values = rows.smiles if kind == "molecule" else rows.texts
    if not use_ray:
        return _Embedder(str(model_dir), kind)({column: np.array(values, dtype=object)})["embedding"]
    import ray.data

    dataset = ray.data.from_items([{column: v, "position": i} for i, v in enumerate(values)])
    embedded = dataset.map_batches(_Embedder, fn_constructor_args=(str(model_dir), kind), batch_size=batch_size,
                                   concurrency=concurrency, batch_format="numpy")
    batches = list(embedded.iter_batches(batch_size=None, batch_format="numpy"))
    positions = np.concatenate([b["position"] for b in batches])
    vectors = np.concatenate([np.stack(b["embedding"]) for b in batches])
    out = np.empty_like(vectors)
    out[positions] = vectors
    return out


class _Embedder:
    """Ray Data callable class: loads the model once per actor, embeds a batch of SMILES or texts."""

    def __init__(self, model_dir: str, kind: str):
        import torch

        from tmr.model import from_pretrained

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        self.model, self.kind = from_pretrained(model_dir), kind

    def __call__(self, batch: dict) -> dict:
        if self.kind == "molecule":
            vectors = self.model.encode_molecule([str(s) for s in batch["smiles"]])
        else:
            vectors = self.model.encode_text([str(t) for t in batch["text"]])
        return {**batch, "embedding": vectors.numpy()}
