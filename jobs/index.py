"""Ray job: embed a molecule library (or a text corpus) with a trained model into an index directory.

    python jobs/index.py --model runs/cpu/best --out runs/index/molecules              # ChEBI-20 (all splits present)
    python jobs/index.py --model runs/cpu/best --library my_library.sdf --index hnsw --out runs/index/mine
    python jobs/index.py --model runs/cpu/best --kind text --out runs/index/texts      # ChEBI-20 descriptions

Embedding runs in parallel with Ray Data (map_batches over model actors, with a progress bar);
SMILES are canonicalised, duplicates by InChIKey dropped, unparsable rows reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path


from tmr.data import available_splits, resolve_data_root
from tmr.distributed import init_ray
from tmr.index import embed_rows, read_library, write_index


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
    parser.add_argument("--model", required=True, help="model directory (runs/<name>/best)")
    parser.add_argument("--library", help="SMILES / TSV / CSV / SDF; default: ChEBI-20, every split present")
    parser.add_argument("--data", help="ChEBI-20 data root (for the default library)")
    parser.add_argument("--kind", default="molecule", choices=["molecule", "text"])
    parser.add_argument("--index", default="exact", choices=["exact", "hnsw"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--actors", type=int, default=1, help="model replicas embedding in parallel")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    init_ray(args.num_cpus)
    library = Path(args.library) if args.library else chebi_library(args.data)
    rows = read_library(library, args.kind)
    started = time.time()
    embeddings = embed_rows(args.model, rows, args.kind, concurrency=args.actors)
    seconds = time.time() - started
    manifest = write_index(args.out, embeddings, rows, args.kind, args.model, args.index, args.dtype)
    manifest["embed_seconds"] = seconds
    manifest["items_per_second"] = len(rows.ids) / seconds
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
