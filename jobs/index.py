"""Ray job: embed a molecule library (or a text corpus) with a trained model into an index directory.

    python jobs/index.py --model runs/cpu/best --out runs/index/molecules              # ChEBI-20 (all splits present)
    python jobs/index.py --model runs/cpu/best --library ../shared/data/moses/train.csv.gz --limit 1000000 \\
        --index hnsw --actors 2 --out runs/index/moses_1m       # HNSW (M 48): 1.1 ms a text query at recall@10 0.95
    python jobs/index.py --model runs/cpu/best --kind text --out runs/index/texts      # ChEBI-20 descriptions
    python jobs/index.py --from-index runs/index/moses_1m --index ivf --index-param nlist=4096 --out runs/index/moses_1m_ivf  # no new embedding

Libraries: SMILES / CSV / TSV (an id column, else the row number) or SDF, each optionally .gz.
Work is cut into chunks embedded in parallel by Ray Data actors (`--actors`, `--threads` each) with
a progress bar and ETA; finished chunks are kept under `<out>.partial/`, so a killed build run
again with the same arguments continues where it stopped (tmr/library.py). SMILES are
canonicalised, duplicates (same canonical SMILES) dropped, unparsable rows reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from tmr.data import available_splits, resolve_data_root
from tmr.distributed import init_ray
from tmr.index import INDEX_TYPES, reindex
from tmr.library import build_index, recall_queries


def chebi_library(data: str | None) -> Path:
    """Every pair of every ChEBI-20 split present, as one TSV (the built-in default library)."""
    files = available_splits(resolve_data_root(data))
    header, lines = None, []
    for name in ("train", "validation", "test"):
        if name in files:
            first, *body = files[name].read_text(encoding="utf-8").splitlines()
            header = header or first
            lines.extend(body)
    lines.insert(0, header)
    path = Path(tempfile.mkdtemp()) / "chebi20_all.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (runs/<name>/best); with --from-index, the one it was built with")
    parser.add_argument("--from-index", help="an index directory to rebuild with another --index (and --index-param), "
                        "reusing its embeddings and metadata")
    parser.add_argument("--index-param", action="append", default=[], metavar="NAME=INT",
                        help="an ANN build parameter: M, efConstruction (hnsw; default 48, 200), nlist (ivf, ivfpq); repeatable")
    parser.add_argument("--library", help="SMILES / CSV / TSV / SDF, optionally .gz; default: ChEBI-20, every split present")
    parser.add_argument("--limit", type=int, help="index only the first N rows of the library")
    parser.add_argument("--data", help="ChEBI-20 data root (for the default library)")
    parser.add_argument("--kind", default="molecule", choices=["molecule", "text"])
    parser.add_argument("--index", default="exact", choices=INDEX_TYPES,
                        help="approximate ones get efSearch / nprobe chosen for recall@10 >= --recall-target")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--chunk-size", type=int, default=10_000, help="rows per resumable chunk")
    parser.add_argument("--actors", type=int, default=1, help="model replicas embedding in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs reserved) per actor")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--no-ray", action="store_true", help="embed in this process (no Ray)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = {name: int(value) for name, value in (spec.split("=", 1) for spec in args.index_param)}
    except ValueError:
        parser.error(f"--index-param takes NAME=INT, got {args.index_param}")
    if args.from_index:
        source = json.loads((Path(args.from_index) / "manifest.json").read_text())
        model = args.model or source["model"]
        queries = recall_queries(model, source.get("library") or chebi_library(args.data), source["kind"],
                                 source.get("limit"), args.data)
        print(json.dumps(reindex(args.from_index, args.out, args.index, queries, args.recall_target, params), indent=2))
        return
    if not args.model:
        parser.error("--model is required (unless --from-index)")
    if not args.no_ray:
        init_ray(args.num_cpus, dashboard=False)
    library = Path(args.library) if args.library else chebi_library(args.data)
    queries = recall_queries(args.model, library, args.kind, args.limit, args.data) if args.index != "exact" else None
    manifest = build_index(library, args.model, args.out, args.kind, args.index, args.dtype, args.limit,
                           args.chunk_size, args.actors, args.threads, use_ray=not args.no_ray, queries=queries,
                           recall_target=args.recall_target, params=params)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
