"""ANN benchmark (prints figures, writes JSON): recall@10 and search time of index directories over the
same library, on text queries none of them was tuned on.

A served text query lands off the molecule manifold, where an approximate index needs its widest
search; this measures what each index structure pays for it. Queries: ChEBI-20 validation
descriptions after the first `--skip` (jobs/index.py tunes efSearch / nprobe on the first 1,000), encoded
by the model the indexes were built with. Each index is searched with its manifest's parameters, one
query at a time on one thread (as a replica searches), and against exact search over its stored vectors.

    python serve/benchmark_ann.py --model runs/cpu/best --index runs/index/moses_1m_ivf \
        --index runs/index/moses_1m_hnsw --out results/benchmark_ann.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def held_out_descriptions(model_dir: str, count: int, skip: int) -> np.ndarray:
    from tmr.data import resolve_data_root
    from tmr.data.sources import read_pairs
    from tmr.model import from_pretrained

    pairs, _ = read_pairs(resolve_data_root(download=False) / "validation.txt")
    texts = [pair.text for pair in pairs[skip:skip + count]]
    if not texts:
        raise SystemExit(f"no validation descriptions after the first {skip}")
    return from_pretrained(model_dir).encode_text(texts).numpy()


def measure(index_dir: str, queries: np.ndarray, exact: dict) -> dict:
    """Recall@10 against exact search and search milliseconds per query, one at a time, one thread."""
    from tmr.index import RetrievalIndex, exact_top_k

    index = RetrievalIndex(index_dir)
    key = (index.manifest["model_fingerprint"], index.manifest["count"])
    if key not in exact:  # the exact top 10 over the same vectors is shared by every index of a library
        exact[key] = exact_top_k(queries, np.load(Path(index_dir) / "embeddings.npy").astype(np.float32))
    for query in queries[:20]:  # warm up: page the index in
        index.search(query[None, :], 10)
    found, milliseconds = [], []
    for query in queries:
        started = time.perf_counter()
        _, rows = index.search(query[None, :], 10)
        milliseconds.append(1000 * (time.perf_counter() - started))
        found.append(rows[0])
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact[key])]))
    return {"index": index.manifest["index"], "build_params": index.manifest.get("build_params", {}),
            "search_params": index.manifest.get("search_params", {}), "count": index.manifest["count"],
            "recall_at_10": recall, "search_ms_p50": float(np.percentile(milliseconds, 50)),
            "search_ms_mean": float(np.mean(milliseconds)), "search_ms_p99": float(np.percentile(milliseconds, 99)),
            "build_s": index.manifest.get("index_build_seconds")}


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model the indexes were built with")
    parser.add_argument("--index", required=True, action="append", help="an index directory (repeatable)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--skip", type=int, default=1000, help="descriptions the index builds tuned on")
    parser.add_argument("--out", default="results/benchmark_ann.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    queries = held_out_descriptions(args.model, args.queries, args.skip)
    exact: dict = {}
    report = {"queries": {"kind": "ChEBI-20 validation descriptions", "count": len(queries), "skip": args.skip},
              "threads": 1, "indexes": {}}
    for index_dir in args.index:
        report["indexes"][index_dir] = result = measure(index_dir, queries, exact)
        print(index_dir, json.dumps(result), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
