"""Large-library builds (tmr/library.py, jobs/index.py): gzipped SMILES / CSV / SDF with a row
limit, and a build killed mid-way that resumes from its last chunk and ends with the same index."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rdkit import Chem

from tmr.config import load_config
from tmr.library import build_index, read_raw
from tmr.model import create_model

REPO = Path(__file__).resolve().parents[1]
MOSES = REPO.parent / "shared" / "data" / "moses" / "train.csv.gz"


@pytest.fixture(scope="module")
def moses_slice(tmp_path_factory) -> Path:
    """MOSES' first 1,000 rows as .csv.gz, with a duplicate of row 5 (written differently) at row 900
    and an unparsable row at 400."""
    if not MOSES.exists():
        pytest.fail(f"{MOSES} not found: ../shared/data beside the checkout")
    with gzip.open(MOSES, "rt") as handle:
        header, rows = handle.readline().strip(), [handle.readline().strip() for _ in range(1000)]
    rows[400] = "C1CC(N"
    rows[900] = Chem.MolToSmiles(Chem.MolFromSmiles(rows[5]), doRandom=True, canonical=False)
    path = tmp_path_factory.mktemp("moses") / "slice.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join([header] + rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return create_model(load_config("tiny").model).save_pretrained(tmp_path_factory.mktemp("model") / "model")


def test_libraries_read_gzipped_with_a_limit(moses_slice, tmp_path):
    rows, skipped, id_url = read_raw(moses_slice, limit=10)
    assert len(rows) == 10 and not skipped and id_url is None
    assert [r[0] for r in rows] == [f"row{i}" for i in range(1, 11)]  # no id column: the row number
    smiles = [r[1] for r in rows]
    with gzip.open(tmp_path / "lib.smi.gz", "wt") as handle:
        handle.write("\n".join(f"{s} mol{i}" for i, s in enumerate(smiles)) + "\n")
    assert read_raw(tmp_path / "lib.smi.gz", limit=4)[0] == [(f"mol{i}", s, "", "") for i, s in enumerate(smiles[:4])]
    with gzip.open(tmp_path / "lib.sdf.gz", "wt") as handle:
        writer = Chem.SDWriter(handle)
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s)
            mol.SetProp("_Name", f"sd{i}")
            writer.write(mol)
        writer.close()
    sdf = read_raw(tmp_path / "lib.sdf.gz", limit=3)[0]
    assert [(r[0], Chem.CanonSmiles(r[1])) for r in sdf] == [(f"sd{i}", Chem.CanonSmiles(s)) for i, s in enumerate(smiles[:3])]


def test_a_killed_build_resumes_and_ends_with_the_same_index(moses_slice, tiny_model, tmp_path, local_ray):
    reference = build_index(moses_slice, tiny_model, tmp_path / "reference", chunk_size=10, use_ray=False, progress=False)
    assert reference["count"] == 998 and reference["skipped"] == 2  # the bad row and the duplicate
    skipped = dict(json.loads((tmp_path / "reference/skipped.json").read_text()))
    assert "C1CC(N" in skipped["row401"] and skipped["row901"].startswith("duplicate of row6")

    out = tmp_path / "resumed"
    command = [sys.executable, "jobs/index.py", "--model", str(tiny_model), "--library", str(moses_slice),
               "--chunk-size", "10", "--out", str(out), "--no-ray"]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "resumed.partial"
    deadline = time.time() + 300
    while len(list(partial.glob("chunk_*.npz"))) < 3 and time.time() < deadline and job.poll() is None:
        time.sleep(0.01)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    finished = len(list(partial.glob("chunk_*.npz")))
    assert 3 <= finished < 100 and not out.exists(), "the build was not killed mid-way"

    # run again, this time through Ray Data with 2 actors: it skips the chunks already written and
    # ends with the very same index (bit for bit: each chunk is computed the same way in any process)
    manifest = build_index(moses_slice, tiny_model, out, chunk_size=10, actors=2, progress=False)
    assert manifest["resumed_chunks"] >= finished and not partial.exists()
    assert manifest["embeddings_sha256"] == reference["embeddings_sha256"]
    # other chunk sizes batch other molecules together: the same index up to float rounding (the
    # encoder computes each distinct atom environment of a batch once)
    rechunked = build_index(moses_slice, tiny_model, tmp_path / "rechunked", chunk_size=500, use_ray=False, progress=False)
    assert rechunked["count"] == reference["count"]
    assert np.allclose(np.load(tmp_path / "rechunked/embeddings.npy"), np.load(out / "embeddings.npy"), atol=1e-6)
    assert pq.read_table(out / "metadata.parquet").equals(pq.read_table(tmp_path / "reference/metadata.parquet"))
    assert json.loads((out / "skipped.json").read_text()) == json.loads((tmp_path / "reference/skipped.json").read_text())


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_is_tuned_to_the_recall_target_on_held_out_queries(moses_slice, tiny_model, tmp_path, index_type):
    from tmr.index import HNSW_BUILD, RetrievalIndex, exact_top_k, recall_at_10
    from tmr.model import from_pretrained

    with gzip.open(MOSES, "rt") as handle:
        held_out = [line.strip() for _, line in zip(range(1302), handle)][1102:]  # rows the slice does not hold
    queries = {"held_out_molecules": from_pretrained(tiny_model).encode_molecule(held_out).numpy()}
    manifest = build_index(moses_slice, tiny_model, tmp_path / index_type, index_type=index_type, chunk_size=500,
                           use_ray=False, progress=False, queries=queries, recall_target=0.97)
    parameter = "efSearch" if index_type == "hnsw" else "nprobe"
    assert manifest["recall_at_10"]["held_out_molecules"] >= 0.97 and parameter in manifest["search_params"]
    assert [point[parameter] for point in manifest["recall_curve"]][-1] == manifest["search_params"][parameter]
    assert manifest["memory_per_million_bytes"]["fp32"] == manifest["dim"] * 4 * 10**6
    if index_type == "hnsw":  # built as the manifest says: the denser graph text queries need (tmr.index.HNSW_BUILD)
        loaded = RetrievalIndex(tmp_path / index_type)  # held: `.index.hnsw` is a view into the faiss index it owns
        graph = loaded.index.hnsw
        assert manifest["build_params"] == HNSW_BUILD == {"M": graph.nb_neighbors(1), "efConstruction": graph.efConstruction}
    embeddings = np.load(tmp_path / index_type / "embeddings.npy")
    exact = exact_top_k(queries["held_out_molecules"], embeddings)
    for shards in (1, 2):  # loaded from disk, or rebuilt per shard with the manifest's parameters
        index = RetrievalIndex(tmp_path / index_type, 0, shards)
        assert recall_at_10(index.index, queries["held_out_molecules"], exact_top_k(queries["held_out_molecules"], embeddings[index.rows])) >= 0.9
    assert recall_at_10(RetrievalIndex(tmp_path / index_type).index, queries["held_out_molecules"], exact) >= 0.97


def test_a_search_that_finds_fewer_than_k_returns_only_what_it_found(moses_slice, tiny_model, tmp_path):
    """An approximate index can find fewer than k (a filtered search asks for up to 20,000; HNSW at
    efSearch 2048 found 8,349 of 20,000 over 1M MOSES). faiss marks the rest -1, which used to index
    the library's last row: the served candidates then held it 11,651 times, scored -3.4e38. Now the
    places stay -1, reading a -1 (or another shard's row) is an error, and a shard answers what it found."""
    from serve.app import ShardIndex
    from tmr.index import RetrievalIndex

    build_index(moses_slice, tiny_model, tmp_path / "ivf", index_type="ivf", chunk_size=500, use_ray=False,
                progress=False, params={"nlist": 8})
    index = RetrievalIndex(tmp_path / "ivf")
    index.index.nprobe = 1  # one list of eight: about an eighth of the library is reachable
    query = np.load(tmp_path / "ivf" / "embeddings.npy")[:1]
    scores, rows = index.search(query, len(index))
    found = rows[0] >= 0
    assert 0 < found.sum() < len(index) and (rows[0][~found] == -1).all() and found[:found.sum()].all()
    assert len(set(rows[0][found].tolist())) == found.sum() and rows[0][0] == 0  # distinct, itself first
    with pytest.raises(KeyError, match="not in this index"):
        index.records(rows[0])
    assert [r["smiles"] for r in index.records(rows[0][found])] == [index.record(int(r))["smiles"] for r in rows[0][found]]
    with pytest.raises(KeyError, match="not in this index"):
        RetrievalIndex(tmp_path / "ivf", 1, 2).records([0])  # row 0 lives in shard 0 of 2
    shard = ShardIndex(str(tmp_path / "ivf"))
    shard.index.index.nprobe = 1
    shard_scores, shard_rows, records = shard.search(query[0], len(index))
    assert shard_rows.tolist() == rows[0][found].tolist() and np.allclose(shard_scores, scores[0][found])
    assert [r["smiles"] for r in records] == [index.record(int(r))["smiles"] for r in shard_rows]


def test_an_index_stores_what_a_served_result_shows_for_each_molecule(moses_slice, tiny_model, tmp_path):
    """InChIKey and properties are computed once at build, and equal to tmr.chem's for every row,
    in the whole index and in each shard of it."""
    from tmr.chem import inchikey, properties
    from tmr.index import RetrievalIndex

    build_index(moses_slice, tiny_model, tmp_path / "index", limit=300, chunk_size=100, use_ray=False, progress=False)
    rows = pq.read_table(tmp_path / "index/metadata.parquet").to_pylist()
    assert len(rows) == 300
    for row in rows:
        assert row["inchikey"] == inchikey(row["smiles"]) and len(row["inchikey"]) == 27
        assert row["properties"] == properties(row["smiles"])
    for shard in range(2):
        index = RetrievalIndex(tmp_path / "index", shard, 2)
        assert index.records(index.rows[::-7]) == [rows[r] for r in index.rows[::-7]]
    assert RetrievalIndex(tmp_path / "index").record(123) == rows[123]


def test_an_index_built_before_stored_decorations_reads_the_same_rows(moses_slice, tiny_model, tmp_path):
    """An index whose metadata has no inchikey / properties columns (built before they were stored)
    gets them computed where rows are read, equal to what a new build stores, in the whole index
    and in each shard of it: the ingress reads rows one way for both."""
    import shutil

    from tmr.index import RetrievalIndex

    build_index(moses_slice, tiny_model, tmp_path / "new", limit=120, chunk_size=60, use_ray=False, progress=False)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    table = pq.read_table(tmp_path / "old/metadata.parquet")
    pq.write_table(table.drop_columns(["inchikey", "properties"]), tmp_path / "old/metadata.parquet")
    for shards in (1, 2):
        for shard in range(shards):
            new, old = RetrievalIndex(tmp_path / "new", shard, shards), RetrievalIndex(tmp_path / "old", shard, shards)
            assert "inchikey" not in old.metadata.column_names
            assert old.records(old.rows[::-3]) == new.records(new.rows[::-3])


def test_an_index_rebuilt_with_another_ann_keeps_its_rows_and_meets_the_recall_target(moses_slice, tiny_model,
                                                                                      tmp_path):
    """`jobs/index.py --from-index DIR --index ivf --index-param nlist=16`: the same embeddings and
    metadata under a new ANN (no embedding), its build parameters in the manifest, its search
    parameter tuned to the recall target again, and searches that find what exact search finds."""
    from tmr.index import RetrievalIndex, exact_top_k, recall_at_10

    build_index(moses_slice, tiny_model, tmp_path / "hnsw", index_type="hnsw", chunk_size=500, use_ray=False,
                progress=False)
    command = [sys.executable, str(REPO / "jobs" / "index.py"), "--from-index", str(tmp_path / "hnsw"),
               "--index", "ivf", "--index-param", "nlist=16", "--recall-target", "0.97", "--out", str(tmp_path / "ivf")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "ivf" / "manifest.json").read_text())
    source = json.loads((tmp_path / "hnsw" / "manifest.json").read_text())
    assert manifest["index"] == "ivf" and manifest["build_params"] == {"nlist": 16}
    assert manifest["search_params"]["nlist"] == 16 and "nprobe" in manifest["search_params"]
    assert min(manifest["recall_at_10"].values()) >= 0.97 and "efSearch" not in manifest["search_params"]
    assert (manifest["count"], manifest["model_fingerprint"]) == (source["count"], source["model_fingerprint"])
    for name in ("embeddings.npy", "metadata.parquet"):
        assert (tmp_path / "ivf" / name).read_bytes() == (tmp_path / "hnsw" / name).read_bytes()
    embeddings = np.load(tmp_path / "ivf" / "embeddings.npy")
    queries = embeddings[::7] + 0.05 * np.random.default_rng(0).standard_normal(embeddings[::7].shape).astype(np.float32)
    assert recall_at_10(RetrievalIndex(tmp_path / "ivf").index, queries, exact_top_k(queries, embeddings)) >= 0.9
    bad = subprocess.run(command[:-1] + [str(tmp_path / "bad")] + ["--index-param", "nlist=many"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "NAME=INT" in bad.stderr
