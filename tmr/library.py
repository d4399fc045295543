"""Building an index from a large library, in chunks that survive a crash.

    build_index("moses/train.csv.gz", "runs/cpu/best", "runs/index/moses_1m", limit=1_000_000)

The driver reads the raw rows (SMILES/CSV/TSV, .sdf, each optionally .gz; the first `limit`),
cuts them into chunks of `chunk_size` rows and hands the chunks to Ray Data actors (`actors` of
them, `threads` torch threads each): each parses, canonicalises, featurises and embeds its rows. The driver writes every finished chunk atomically under `<out>.partial/`
(a progress bar with ETA over molecules). A build killed at any point and started again with the
same arguments skips the chunks already written; at the end, duplicates (same canonical SMILES; the
first row wins) are dropped across chunks in row order, so a resumed build writes the same index as an
uninterrupted one (bit for bit with the same chunk size and threads; others change float rounding
only), and the partial directory is removed.
Duplicates are found by canonical SMILES (computed anyway). Each molecule's InChIKey and properties
(tmr.chem) are computed here too, by the actors, and stored in the index: about as much work again
as featurising it, done once, instead of on every served result (docs/serving.md, measured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from tmr.index import PUBCHEM_COMPOUND, LibraryRows, model_fingerprint, write_index

log = logging.getLogger("tmr.library")
FIELDS = ("ids", "smiles", "names", "texts")
DECORATIONS = ("inchikeys", "properties")  # molecules only: what a served result shows beside its row
EMBED_BATCH = 1024  # molecules per forward pass: the more, the more atom environments repeat (tmr/encoders.py)


def read_raw(path: str | Path, kind: str = "molecule", limit: int | None = None) -> tuple[list[tuple], list, str | None]:
    """(rows of (id, smiles, name, text), skipped, id_url), as read: nothing parsed yet."""
    import gzip

    from rdkit import Chem

    from tmr.data.sources import read_pairs

    path = Path(path)
    if path.name.lower().removesuffix(".gz").endswith(".sdf"):
        handle = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        rows, skipped = [], []
        with handle:
            for number, mol in enumerate(Chem.ForwardSDMolSupplier(handle), start=1):
                if limit is not None and number > limit:
                    break
                name = mol.GetProp("_Name") if mol is not None and mol.HasProp("_Name") else ""
                if mol is None:
                    skipped.append((f"record{number}", "RDKit cannot read this SD record"))
                else:
                    rows.append((name or f"record{number}", Chem.MolToSmiles(mol), name, ""))
        return rows, skipped, None
    pairs, report = read_pairs(path, require_text=(kind == "text"), limit=limit)
    return ([(p.id, p.smiles, "", p.text or "") for p in pairs], list(report.skipped),
            PUBCHEM_COMPOUND if report.id_column == "cid" else None)


def _node_id() -> str:
    """The Ray node this process runs on (the host name outside Ray)."""
    import platform

    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else platform.node()


class ChunkEmbedder:
    """Ray Data callable class: one model per actor; a batch is one or more chunks of raw rows."""

    def __init__(self, model_dir: str, kind: str, threads: int = 1):
        import torch

        from tmr.model import from_pretrained

        torch.set_num_threads(threads)
        self.model, self.kind = from_pretrained(model_dir), kind
        self.node = _node_id()

    def __call__(self, batch: dict) -> dict:
        out = {key: [] for key in ("chunk", "node", "embeddings", "kept", *FIELDS, *DECORATIONS, "skipped")}
        for chunk, rows in zip(batch["chunk"], batch["rows"]):
            embedded = embed_chunk(self.model, json.loads(rows), self.kind)
            out["chunk"].append(chunk)
            out["node"].append(self.node)
            for key, value in embedded.items():
                out[key].append(value if key == "embeddings" else json.dumps(value))
        return out


def embed_chunk(model, rows: list[list], kind: str, batch_size: int = EMBED_BATCH) -> dict:
    """Parse, canonicalise, featurise (molecules only: a text corpus embeds its texts) and embed one
    chunk; unparsable rows are skipped with their reason. Returns the embeddings and, per kept
    row, its position in the chunk. Molecules are featurised straight into one PyG Batch per
    `batch_size` (`graph_batch`): the per-molecule graphs were most of a build's time. Each kept
    molecule also gets its InChIKey and properties (empty lists for a text corpus)."""
    from tmr.chem import inchikey_of, properties_of
    from tmr.data.featurize import InvalidMolecule, graph_batch, parse_smiles

    parsed, skipped = [], []
    for position, (identifier, smiles, name, text) in enumerate(rows):
        try:
            parsed.append((position, parse_smiles(smiles)))
        except InvalidMolecule as error:
            skipped.append((position, str(error)))
    kept, vectors = [], []
    if kind == "molecule":
        for start in range(0, len(parsed), batch_size):
            part = parsed[start:start + batch_size]
            graphs, featurised, rejected = graph_batch([molecule.mol for _, molecule in part])
            skipped += [(part[i][0], f"unsupported atom or bond in {rows[part[i][0]][1]!r}: {reason}")
                        for i, reason in rejected.items()]
            kept += [part[i] for i in featurised]
            if featurised:
                vectors.append(model.encode_batch(graphs).numpy())
    else:
        kept = parsed
        vectors = [model.encode_text([rows[position][3] for position, _ in kept]).numpy()] if kept else []
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, model.config.embed_dim), np.float32)
    fields = {"ids": [rows[p][0] for p, _ in kept], "smiles": [m.canonical_smiles for _, m in kept],
              "names": [rows[p][2] for p, _ in kept], "texts": [rows[p][3] for p, _ in kept],
              "inchikeys": [inchikey_of(m.mol) for _, m in kept] if kind == "molecule" else [],
              "properties": [properties_of(m.mol) for _, m in kept] if kind == "molecule" else []}
    skipped = [(rows[position][0], reason) for position, reason in sorted(skipped)]
    return {"embeddings": embeddings.astype(np.float32), "kept": [p for p, _ in kept], **fields, "skipped": skipped}


def _save_chunk(partial: Path, chunk: int, embeddings: np.ndarray, record: dict) -> None:
    """Write one finished chunk atomically: a temporary file, then a rename."""
    target = partial / f"chunk_{chunk:06d}.npz"
    staging = partial / f".chunk_{chunk:06d}.{os.getpid()}.tmp.npz"
    np.savez(staging, embeddings=embeddings, record=np.frombuffer(json.dumps(record).encode(), dtype=np.uint8))
    os.replace(staging, target)


def _load_chunk(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as data:
        return data["embeddings"], json.loads(data["record"].tobytes().decode())


def build_index(library: str | Path, model_dir: str | Path, out: str | Path, kind: str = "molecule",
                index_type: str = "exact", dtype: str = "float32", limit: int | None = None, chunk_size: int = 10_000,
                actors: int = 1, threads: int = 1, use_ray: bool = True, progress: bool = True,
                queries: dict[str, np.ndarray] | None = None, recall_target: float = 0.95, params: dict | None = None
                ) -> dict:
    """Build (or resume building) an index directory; returns its manifest with throughput figures.
    `queries` (name -> embeddings) are what an approximate index's recall is tuned on; `params`: the
    ANN's build parameters (tmr.index.build_faiss)."""
    from tqdm.auto import tqdm

    started = time.time()
    raw, skipped_reading, id_url = read_raw(library, kind, limit)
    read_seconds = time.time() - started
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    plan = {"library": str(Path(library).resolve()), "size": Path(library).stat().st_size, "kind": kind,
            "limit": limit, "chunk_size": chunk_size, "rows": len(raw), "model": model_fingerprint(model_dir),
            "batch_size": EMBED_BATCH,  # embeddings differ by float rounding with the batch: one build, one size
            "decorations": list(DECORATIONS)}
    plan_file = partial / "build.json"
    if partial.exists() and (not plan_file.exists() or json.loads(plan_file.read_text()) != plan):
        log.warning("%s holds a different build; starting over", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps(plan, indent=2))
    chunks = [raw[i:i + chunk_size] for i in range(0, len(raw), chunk_size)]
    done = {int(p.stem.split("_")[1]) for p in partial.glob("chunk_*.npz")}
    todo = [i for i in range(len(chunks)) if i not in done]
    if done:
        log.info("resuming %s: %d of %d chunks already built", out, len(done), len(chunks))
    bar = tqdm(total=len(raw), initial=sum(len(chunks[i]) for i in done), unit="mol" if kind == "molecule" else "text",
               desc=f"indexing {Path(library).name}", disable=not progress, smoothing=0.1)
    embed_started = time.time()
    chunks_per_node: dict[str, int] = {}
    for chunk, node, embeddings, record in _embed_chunks(chunks, todo, model_dir, kind, actors, threads, use_ray):
        _save_chunk(partial, chunk, embeddings, record)
        chunks_per_node[node] = chunks_per_node.get(node, 0) + 1
        bar.update(len(chunks[chunk]))
    bar.close()
    embed_seconds = time.time() - embed_started
    figures = {"library": str(library), "limit": limit, "read_seconds": round(read_seconds, 2),
               "embed_seconds": round(embed_seconds, 2), "resumed_chunks": len(done), "actors": actors,
               "chunks_per_node": chunks_per_node,
               "items_per_second": round(sum(len(chunks[i]) for i in todo) / max(embed_seconds, 1e-9), 1)}
    manifest = _assemble(partial, len(chunks), kind, out, model_dir, index_type, dtype, skipped_reading, id_url, figures,
                         queries, recall_target, params)
    shutil.rmtree(partial)
    return manifest


def _embed_chunks(chunks: list, todo: list[int], model_dir, kind: str, actors: int, threads: int, use_ray: bool):
    """(chunk number, node that embedded it, embeddings, record) for each chunk in `todo`, as they finish."""
    if not todo:
        return
    if not use_ray:
        embedder = ChunkEmbedder(str(model_dir), kind, threads)
        for chunk in todo:
            yield _unpack(embedder({"chunk": [chunk], "rows": [json.dumps(chunks[chunk])]}), 0)
        return
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the build's own bar counts molecules
    # start embedding once the whole actor pool is up: otherwise the first actor ready (a model load
    # takes seconds) takes every chunk of a small build, and a large one starts on part of the cluster
    context.wait_for_min_actors_s = 600
    items = [{"chunk": chunk, "rows": json.dumps(chunks[chunk])} for chunk in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ChunkEmbedder, fn_constructor_args=(str(model_dir), kind, threads), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads, batch_format="numpy")
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["chunk"])):
            yield _unpack(batch, i)


def _unpack(batch: dict, i: int) -> tuple[int, str, np.ndarray, dict]:
    embeddings = np.asarray(batch["embeddings"][i], dtype=np.float32)
    record = {key: json.loads(batch[key][i]) for key in ("kept", *FIELDS, *DECORATIONS, "skipped")}
    return int(batch["chunk"][i]), str(batch["node"][i]), embeddings.reshape(len(record["kept"]), -1), record


def _assemble(partial: Path, count: int, kind: str, out: Path, model_dir, index_type: str, dtype: str,
              skipped: list, id_url: str | None, figures: dict, queries: dict | None, recall_target: float,
              params: dict | None = None) -> dict:
    """Concatenate the chunks in row order, drop duplicate molecules (first row wins), write the index."""
    rows = LibraryRows([], [], [], [], list(skipped), id_url)
    fields = FIELDS
    if kind == "molecule":
        rows.inchikeys, rows.properties, fields = [], [], FIELDS + DECORATIONS
    vectors, seen = [], {}
    for chunk in range(count):
        embeddings, record = _load_chunk(partial / f"chunk_{chunk:06d}.npz")
        rows.skipped.extend(tuple(s) for s in record["skipped"])
        keep = []
        for j, (identifier, smiles) in enumerate(zip(record["ids"], record["smiles"])):
            if kind == "molecule" and smiles in seen:
                rows.skipped.append((identifier, f"duplicate of {seen[smiles]} (same canonical SMILES)"))
                continue
            seen.setdefault(smiles, identifier)
            keep.append(j)
            for key in fields:
                getattr(rows, key).append(record[key][j])
        vectors.append(embeddings[keep])
    embeddings = np.concatenate(vectors) if vectors else np.zeros((0, 1), np.float32)
    figures["embeddings_sha256"] = hashlib.sha256(embeddings.tobytes()).hexdigest()[:16]
    return write_index(out, embeddings, rows, kind, model_dir, index_type, dtype, extra=figures, queries=queries,
                       recall_target=recall_target, params=params)


def recall_queries(model_dir: str | Path, library: str | Path, kind: str, limit: int | None, data: str | None,
                   count: int = 1000) -> dict[str, np.ndarray]:
    """Real queries for tuning an approximate index: ChEBI-20 validation descriptions (text ->
    molecule) and, for a library indexed with --limit, the `count` molecules after the limit
    (molecules the index does not hold)."""
    from tmr.data import resolve_data_root
    from tmr.data.featurize import InvalidMolecule
    from tmr.data.sources import read_pairs
    from tmr.model import from_pretrained

    model, queries = from_pretrained(model_dir), {}
    validation = resolve_data_root(data, download=False) / "validation.txt"
    if validation.exists():
        pairs, _ = read_pairs(validation)
        queries["validation_texts"] = model.encode_text([p.text for p in pairs[:count]]).numpy()
    if kind == "molecule" and limit:
        held_out = [row[1] for row in read_raw(library, kind, limit + count)[0][limit:]]
        vectors = []
        for smiles in held_out:
            try:
                vectors.append(model.encode_molecule([smiles]).numpy())
            except InvalidMolecule:
                continue
        if vectors:
            queries["held_out_molecules"] = np.concatenate(vectors)
    return queries
