"""`tmr` command line: train (one process), eval (Text2Mol protocol), embed (texts or SMILES -> .npy).

    tmr train --config cpu train.epochs=3 output=runs/mine
    tmr eval --model runs/cpu/best --split validation --pool all
    tmr embed --model runs/cpu/best --input molecules.smi --kind molecule --out mols.npy
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np


def _train(args: argparse.Namespace) -> int:
    from tmr.config import load_config
    from tmr.train import fit

    config = load_config(args.config, args.overrides)
    if args.data:
        config.data = args.data
    result = fit(config)
    print(json.dumps({"best_epoch": result["best_epoch"], "validation": result["validation"]}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Metrics of a model directory on one split: `select` is what training selects on (validation,
    or its provisional held-out part without train.txt)."""
    from tmr.data import load_splits, resolve_data_root
    from tmr.model import from_pretrained
    from tmr.train import evaluate

    splits = load_splits(resolve_data_root(args.data))
    if args.split not in splits.query_sets:
        print(f"tmr eval: split {args.split!r} is not in the data root (present: {sorted(splits.query_sets)})",
              file=sys.stderr)
        return 2
    metrics = evaluate(from_pretrained(args.model), splits, args.split, pools=(args.pool,), progress=True)
    print(json.dumps({"split": args.split, "data": splits.label, **metrics[args.pool]}, indent=2))
    return 0


def _embed(args: argparse.Namespace) -> int:
    from tmr.data import InvalidMolecule, featurize, read_pairs
    from tmr.model import from_pretrained

    model = from_pretrained(args.model)
    path = Path(args.input)
    if args.kind == "text":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        if lines and "\t" in lines[0]:
            pairs, _ = read_pairs(path)
            ids, texts = [p.id for p in pairs], [p.text for p in pairs]
        else:
            ids, texts = [str(i) for i, t in enumerate(lines) if t], [t for t in lines if t]
        embeddings = model.encode_text(texts)
    else:
        pairs, _ = read_pairs(path, require_text=False)
        ids, graphs = [], []
        for pair in pairs:
            try:
                graphs.append(featurize(pair.smiles))
                ids.append(pair.id)
            except InvalidMolecule as error:
                print(f"skipped {pair.id}: {error}", file=sys.stderr)
        embeddings = model.encode_graphs(graphs)
    out = Path(args.out)
    np.save(out, embeddings.numpy().astype(np.float32))
    out.with_suffix(".ids.txt").write_text("\n".join(ids) + "\n")
    print(json.dumps({"embeddings": str(out), "ids": str(out.with_suffix(".ids.txt")), "count": len(ids),
                      "dim": int(embeddings.shape[1])}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train in one process (no Ray); see jobs/train.py for Ray Train")
    train.add_argument("--config", default="cpu", help="preset (paper, cpu, tiny) or YAML file")
    train.add_argument("--data", help="data root holding {train,validation,test}.txt")
    train.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.epochs=3")
    train.set_defaults(run=_train)
    ev = sub.add_parser("eval", help="retrieval metrics of a model directory on one split")
    ev.add_argument("--model", required=True)
    ev.add_argument("--data")
    ev.add_argument("--split", default="test", choices=["train", "validation", "test", "select"],
                    help="select: what training selects on (validation, or its provisional held-out part)")
    ev.add_argument("--pool", default="all", choices=["all", "split"],
                    help="all: Text2Mol's protocol, texts against every molecule of molecules.tsv (33,010 for "
                         "ChEBI-20; else of every split present), molecules against every text present; "
                         "split: the split alone")
    ev.set_defaults(run=_eval)
    embed = sub.add_parser("embed", help="embed a file of texts or SMILES into .npy (+ .ids.txt)")
    embed.add_argument("--model", required=True)
    embed.add_argument("--input", required=True, help="one text / SMILES per line, or a TSV/CSV with a header")
    embed.add_argument("--kind", required=True, choices=["text", "molecule"])
    embed.add_argument("--out", required=True, help="output .npy")
    embed.set_defaults(run=_embed)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"tmr {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
