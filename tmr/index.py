"""Retrieval indexes: a library of molecules (or texts) embedded by a trained model, searchable.

An index directory holds
    embeddings.npy     (N, D) float32 or float16, unit norm, row i = metadata row i
    metadata.parquet   id, smiles (canonical), name, text; for molecules also inchikey and properties
                       (tmr.chem's, computed once at build so that a served result is read, not computed)
    index.faiss        the approximate index (HNSW, IVF-flat or IVF-PQ); an exact index searches
                       embeddings.npy directly (numpy / torch beat faiss' flat index here)
    manifest.json      kind, model fingerprint, count, dim, index type, its search parameter chosen
                       for recall@10 >= 0.95 against exact search on real queries (and the curve)
    skipped.json       rows not indexed, with their id and why
No pickle anywhere: numpy without objects, parquet, faiss' own format and JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
    names: list[str]
    texts: list[str]
    skipped: list[tuple[str, str]]
    id_url: str | None = None  # a link per id ("{id}" filled in): PubChem when the ids are CIDs
    inchikeys: list[str] | None = None  # molecules: one per row (tmr.chem.inchikey_of)
    properties: list[dict] | None = None  # molecules: one per row (tmr.chem.properties_of)


PUBCHEM_COMPOUND = "https://pubchem.ncbi.nlm.nih.gov/compound/{id}"


INDEX_TYPES = ("exact", "hnsw", "ivf", "ivfpq")


# A denser, more carefully built graph than faiss' usual M 32 / efConstruction 40-80: text queries land off
# the molecule manifold, where a sparse graph needs a wide search. 1M MOSES, ChEBI-20 descriptions held out
# from tuning (serve/benchmark_ann.py): M 32 / 80 needed efSearch 1024 for recall@10 0.950, 2.07 ms a
# query; M 48 / 200 efSearch 512 for 0.950, 1.14 ms; built in 390 s against 172 (docs/serving.md).
HNSW_BUILD = {"M": 48, "efConstruction": 200}


def build_params(kind: str, params: dict | None = None) -> dict:
    """The build parameters an index of `kind` gets: `params` over the defaults (recorded in the manifest)."""
    return {**(HNSW_BUILD if kind == "hnsw" else {}), **(params or {})}


def build_faiss(embeddings: np.ndarray, kind: str, params: dict | None = None):
    """An approximate faiss inner-product index: HNSW (M links), IVF-flat or IVF-PQ (nlist lists,
    trained on the data), with the search parameters in `params` (efSearch / nprobe) applied."""
    import faiss

    data = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim, params = data.shape[1], build_params(kind, params)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["efConstruction"])
    elif kind in ("ivf", "ivfpq"):
        nlist = int(params.get("nlist", max(1, min(4 * int(np.sqrt(len(data))), len(data) // 39))))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # dim / 4 sub-quantisers of 8 bits: 1 byte per 4 dimensions
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, int(params.get("pq_m", dim // 4)), 8, faiss.METRIC_INNER_PRODUCT)
        sample = data[np.random.default_rng(0).choice(len(data), min(len(data), 256 * nlist), replace=False)]
        index.train(sample)
    else:
        raise ValueError(f"unknown approximate index type {kind!r}; use one of {INDEX_TYPES[1:]}")
    index.add(data)
    set_search_params(index, kind, params)
    return index


def set_search_params(index, kind: str, params: dict) -> None:
    if kind == "hnsw":
        index.hnsw.efSearch = int(params.get("efSearch", 128))
    elif kind in ("ivf", "ivfpq"):
        index.nprobe = int(params.get("nprobe", 8))


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, ties by row: numpy for one query, torch (MKL) for a batch,
    the fastest path for each case as measured on 2 cores (README)."""
    if len(queries) == 1:
        scores = (vectors @ queries[0])[None, :]
    else:
        import torch

        scores = torch.from_numpy(queries) @ torch.from_numpy(vectors).T
        scores = scores.numpy()
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    top_scores = np.take_along_axis(scores, top, 1)
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top_scores, order, 1), np.take_along_axis(top, order, 1)


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int = 10, block: int = 256) -> np.ndarray:
    """Exact top-k rows of many queries, `exact_search` over query blocks (bounded memory at 1M rows)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return np.concatenate([exact_search(embeddings, queries[start:start + block], k)[1]
                           for start in range(0, len(queries), block)])


def recall_at_10(index, queries: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top 10 that the index returns, averaged over the queries."""
    _, approx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 10)
    return float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))


def tune_search(index, kind: str, embeddings: np.ndarray, queries: dict[str, np.ndarray], target: float = 0.95) -> dict:
    """The smallest efSearch (HNSW) or nprobe (IVF) at which recall@10 against exact search
    reaches `target` for every query set; returns the parameters and the recall curve."""
    exact = {name: exact_top_k(q, embeddings) for name, q in queries.items() if len(q)}
    # steps of 1.5x, not 2x: a search's cost grows with the parameter, and a doubling past the target paid
    # for up to twice the search needed (1M MOSES, text queries: efSearch 1024 gave 0.934, 2048 0.955)
    steps = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    if kind == "hnsw":
        name, values = "efSearch", [v for v in steps if v >= 16]
    else:
        name, values = "nprobe", [v for v in steps if v < index.nlist] + [index.nlist]
    curve = []
    for value in values:
        set_search_params(index, kind, {name: value})
        recalls = {q: recall_at_10(index, queries[q], e) for q, e in exact.items()}
        curve.append({name: value, **recalls})
        if min(recalls.values()) >= target:
            break
    chosen = curve[-1]
    log.info("%s: %s=%d gives recall@10 %s", kind, name, chosen[name], {q: round(r, 4) for q, r in chosen.items() if q != name})
    return {"search_params": {name: chosen[name]}, "recall_at_10": {q: r for q, r in chosen.items() if q != name},
            "recall_curve": curve, "recall_target": target}


def memory_per_million(dim: int) -> dict:
    """Bytes of vectors per million molecules: fp32, fp16 and PQ codes (dim / 4 bytes)."""
    return {"fp32": dim * 4 * 10**6, "fp16": dim * 2 * 10**6, "pq": dim // 4 * 10**6}


def tuned_index(embeddings: np.ndarray, index_type: str, params: dict | None, queries: dict[str, np.ndarray] | None,
                recall_target: float) -> tuple:
    """(approximate index, its manifest fields): built with `params`, its search parameter the smallest that
    reaches `recall_target` recall@10 against exact search on `queries` (default: 1,000 library items)."""
    index = build_faiss(embeddings, index_type, params)
    if not queries:
        rng = np.random.default_rng(0)
        queries = {"library_items": embeddings[rng.choice(len(embeddings), min(1000, len(embeddings)), replace=False)]}
    fields = {"build_params": build_params(index_type, params), **tune_search(index, index_type, embeddings, queries,
                                                                               recall_target)}
    if "nlist" in dir(index):
        fields["search_params"]["nlist"] = int(index.nlist)
    return index, fields


def write_index(out: str | Path, embeddings: np.ndarray, rows: LibraryRows, kind: str, model_dir: str | Path,
                index_type: str = "exact", dtype: str = "float32", extra: dict | None = None,
                queries: dict[str, np.ndarray] | None = None, recall_target: float = 0.95, params: dict | None = None
                ) -> dict:
    """Write an index directory atomically; returns its manifest (with `extra` fields added).

    An approximate index gets its search parameter chosen here: the smallest that reaches
    `recall_target` recall@10 against exact search on `queries` (name -> unit vectors; default:
    1,000 library items), written into the manifest with the whole recall curve."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.time()
    index, tuned = (None, {}) if index_type == "exact" else tuned_index(embeddings, index_type, params, queries,
                                                                         recall_target)
    manifest = {"kind": kind, "model": str(Path(model_dir).resolve()), "model_fingerprint": model_fingerprint(model_dir),
                "count": int(len(embeddings)), "dim": int(embeddings.shape[1]), "index": index_type, "dtype": dtype,
                "id_url": rows.id_url, **(extra or {}), "memory_per_million_bytes": memory_per_million(embeddings.shape[1]),
                "skipped": len(rows.skipped), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    manifest.update(tuned)
    manifest["index_build_seconds"] = round(time.time() - started, 2)
    with atomic_directory(out) as staging:
        np.save(staging / "embeddings.npy", embeddings.astype(dtype))
        columns = {"id": rows.ids, "smiles": rows.smiles, "name": rows.names, "text": rows.texts}
        if rows.inchikeys is not None:
            columns |= {"inchikey": rows.inchikeys, "properties": rows.properties}
        pq.write_table(pa.table(columns), staging / "metadata.parquet")
        if index is not None:
            faiss.write_index(index, str(staging / "index.faiss"))
        (staging / "skipped.json").write_text(json.dumps(rows.skipped))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def reindex(source: str | Path, out: str | Path, index_type: str, queries: dict[str, np.ndarray] | None = None,
            recall_target: float = 0.95, params: dict | None = None) -> dict:
    """A copy of the index directory `source` with another approximate index (or other build `params`:
    M, efConstruction, nlist) over the same embeddings and metadata: trying an ANN structure costs
    its build, not a new embedding of the library (24 minutes for 1M MOSES molecules on 2 cores).
    Its search parameter is tuned on `queries` as write_index does; returns the new manifest."""
    import shutil

    import faiss

    source, started = Path(source), time.time()
    if index_type not in INDEX_TYPES[1:]:
        raise ValueError(f"reindexing needs an approximate index type, one of {INDEX_TYPES[1:]}")
    manifest = json.loads((source / "manifest.json").read_text())
    embeddings = np.load(source / "embeddings.npy").astype(np.float32, copy=False)
    index, tuned = tuned_index(embeddings, index_type, params, queries, recall_target)
    for stale in ("search_params", "recall_at_10", "recall_curve", "recall_target"):
        manifest.pop(stale, None)
    manifest.update(index=index_type, reindexed_from=str(source.resolve()), **tuned)
    manifest["index_build_seconds"] = round(time.time() - started, 2)
    with atomic_directory(out) as staging:
        for name in ("embeddings.npy", "metadata.parquet", "skipped.json"):
            shutil.copyfile(source / name, staging / name)
        faiss.write_index(index, str(staging / "index.faiss"))
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


class RetrievalIndex:
    """A loaded index directory, or one shard of it (rows shard::num_shards)."""

    def __init__(self, directory: str | Path, shard: int = 0, num_shards: int = 1):
        import faiss
        import pyarrow.parquet as pq

        directory = Path(directory)
        self.manifest = json.loads((directory / "manifest.json").read_text())
        metadata = pq.read_table(directory / "metadata.parquet")
        embeddings = np.load(directory / "embeddings.npy", allow_pickle=False).astype(np.float32, copy=False)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} of {num_shards}")
        self.rows = np.arange(shard, len(embeddings), num_shards)  # global row numbers held here
        self.vectors = None
        if self.manifest["index"] == "exact":  # numpy / torch matmul beat faiss' flat index here (README)
            self.vectors, self.index = np.ascontiguousarray(embeddings[shard::num_shards]), None  # no copy for 1 shard
        elif num_shards == 1:
            self.index = faiss.read_index(str(directory / "index.faiss"))
            set_search_params(self.index, self.manifest["index"], self.manifest.get("search_params", {}))
        else:
            self.index = build_faiss(embeddings[self.rows], self.manifest["index"],
                                     {**self.manifest.get("build_params", {}), **self.manifest.get("search_params", {})})
        # kept columnar (Arrow): a million rows as Python dicts would cost GBs; a result reads its k rows.
        # One chunk per column: `take` across parquet's row-group chunks cost 21 ms for 10 of 1M rows, 0.2 ms here
        self.metadata = (metadata if num_shards == 1 else metadata.take(self.rows)).combine_chunks()

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows), each (Q, min(k, len)), best first; cosine similarity of unit vectors.
        An approximate index can find fewer than k (HNSW asked for more than its search reaches, IVF
        for more than its probed lists hold): those places hold row -1, as faiss marks them."""
        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.vectors is None:
            scores, local = self.index.search(queries, k)
        else:
            scores, local = exact_search(self.vectors, queries, k)
        # faiss' -1 would index the last row: keep it -1
        return scores, np.where(local >= 0, self.rows[np.maximum(local, 0)], -1)

    def records(self, global_rows) -> list[dict]:
        """The metadata rows of these global row numbers, in their order. A molecule index built
        before decorations were stored (no inchikey / properties columns) gets them computed here,
        so every reader sees the same rows whichever build wrote the index."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        if len(global_rows) == 0:
            return []
        positions = np.minimum(np.searchsorted(self.rows, global_rows), len(self.rows) - 1)
        missing = self.rows[positions] != global_rows  # -1 (a place the search found nothing for), another shard's
        if missing.any():
            raise KeyError(f"rows not in this index: {global_rows[missing][:5].tolist()}")
        rows = self.metadata.take(positions).to_pylist()
        if self.manifest.get("kind") == "molecule" and "inchikey" not in self.metadata.column_names:
            from tmr.chem import inchikey, properties

            rows = [{**row, "inchikey": inchikey(row["smiles"]), "properties": properties(row["smiles"])} for row in rows]
        return rows

    def record(self, global_row: int) -> dict:
        return self.records([global_row])[0]


def merge_top_k(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores, rows) into the global top k, ties broken by row number."""
    scores = np.concatenate([s for s, _ in results], axis=1)
    rows = np.concatenate([r for _, r in results], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
