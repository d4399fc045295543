"""Pair datasets (PyG `InMemoryDataset`, featurised once and cached), batching, and the splits.

`MoleculeTextDataset(path)` reads any (id, SMILES, text) file, featurises every molecule once and
caches the graphs under `~/.cache/tmr/processed/<file sha256>/` (built under a file lock, so
processes sharing the cache featurise a file once); unparsable SMILES are counted,
logged with their ids and skipped. `load_splits(root)` gives the fit / select / test sets and the
candidate pool, whatever split files exist (see PROVENANCE.md: without train.txt, a seeded
re-split of validation is used and labelled "provisional").
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.data import ConcatDataset, Dataset, Subset
from torch_geometric.data import Batch, InMemoryDataset

from tmr.atomic import atomic_file
from tmr.data.featurize import featurize_or_error
from tmr.data.parallel import parallel_map
from tmr.data.sources import CACHE, CANDIDATE_POOL, TRAIN_CIDS, available_splits, missing_corpus_files, read_pairs

log = logging.getLogger("tmr.data")
FEATURE_VERSION = "1"  # bump when featurize() changes, so caches are rebuilt
PROVISIONAL_SELECT = 500  # PROVENANCE.md: 2,801 pairs to fit, 500 to select on
PROVISIONAL_SEED = 0


class MoleculeTextDataset(InMemoryDataset):
    """Graphs of one pair file, each carrying `.id`, `.text` and canonical `.smiles`."""

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, require_text: bool = True,
                 progress: bool = True, reuse: MoleculeTextDataset | None = None):
        """`reuse`: an already featurised dataset whose graphs are copied for the molecules both files
        hold (same SMILES string) instead of being featurised again: ChEBI-20's candidate pool holds
        every molecule of the splits and of the derived corpus (on a fresh machine, ~50 s saved)."""
        self.source = Path(path).resolve()
        self.require_text = require_text
        self.progress = progress
        self.reuse = reuse
        digest = hashlib.sha256(self.source.read_bytes()).hexdigest()[:20]
        root = Path(cache_dir or CACHE) / "processed" / f"{digest}-v{FEATURE_VERSION}{'' if require_text else '-notext'}"
        # Side-by-side Tune trials and Ray Train workers build the same cache at once: one of
        # them featurises, the others wait for it and load the result.
        root.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root) + ".lock"):
            super().__init__(str(root), log=False)
        self.load(self.processed_paths[0])
        self.skipped = json.loads(Path(self.processed_paths[1]).read_text())
        if self.skipped:
            log.warning("%s: %d row(s) skipped, e.g. %s", self.source.name, len(self.skipped), self.skipped[:5])

    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_file_names(self) -> list[str]:
        return ["graphs.pt", "skipped.json"]

    def download(self) -> None:  # the source file is given; nothing to fetch
        pass

    def process(self) -> None:
        pairs, report = read_pairs(self.source, require_text=self.require_text)
        graphs, skipped = [], list(report.skipped)
        known = self.reuse.rows_by_smiles() if self.reuse is not None else {}
        featurised = iter(parallel_map(featurize_or_error, [pair.smiles for pair in pairs if pair.smiles not in known],
                                       f"featurising {self.source.name}", self.progress))
        for pair in pairs:
            graph = self.reuse[known[pair.smiles]] if pair.smiles in known else next(featurised)
            if isinstance(graph, str):
                skipped.append((pair.id, graph))
                continue
            graph.id, graph.text = pair.id, pair.text
            graphs.append(graph)
        if not graphs:
            raise ValueError(f"{self.source}: no usable rows ({len(skipped)} skipped)")
        # Written to a private file and renamed into place: a process killed mid-write leaves no
        # truncated graphs.pt for every later run to fail on.
        graphs_path, skipped_path = self.processed_paths
        with atomic_file(graphs_path) as partial:
            self.save(graphs, str(partial))
        with atomic_file(skipped_path) as partial:
            partial.write_text(json.dumps(skipped))

    def rows_by_smiles(self) -> dict[str, int]:
        """The SMILES string of each graph, as its source file writes it -> the graph's row."""
        row = {graph_id: i for i, graph_id in enumerate(self.ids)}
        pairs, _ = read_pairs(self.source, require_text=self.require_text)
        return {pair.smiles: row[pair.id] for pair in pairs if pair.id in row}

    @property
    def texts(self) -> list[str]:
        return list(self._data.text)

    @property
    def ids(self) -> list[str]:
        return list(self._data.id)


class PairCollator:
    """List of graphs -> {"graphs": Batch, "input_ids", "attention_mask"} (text i pairs graph i).

    Given `text_states` (text -> cached output states of a frozen text backbone), batches carry
    the padded states instead of token ids, and the backbone is skipped in training.
    """

    def __init__(self, tokenizer, max_length: int, text_states: dict[str, torch.Tensor] | None = None):
        self.tokenizer, self.max_length, self.text_states = tokenizer, max_length, text_states

    def __call__(self, items: list) -> dict:
        texts = [item.text for item in items]
        text = self.tokenize(texts) if self.text_states is None else self.cached_states(texts)
        return {"graphs": Batch.from_data_list(items), **text}

    def cached_states(self, texts: list[str]) -> dict:
        """{"text_states": (B, T, H) padded cached states, "attention_mask": (B, T)}."""
        states = [self.text_states[text] for text in texts]
        padded = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
        mask = torch.zeros(padded.shape[:2], dtype=torch.long)
        for row, state in enumerate(states):
            mask[row, :len(state)] = 1
        return {"text_states": padded, "attention_mask": mask}

    def tokenize(self, texts: list[str]) -> dict:
        out = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


@dataclass
class Splits:
    """What a run fits on, selects on, tests on, and ranks against."""

    fit: Dataset
    select: Dataset
    test: Dataset | None
    pool: list[MoleculeTextDataset]  # every pair of every split present: the molecule -> text pool
    select_positions: torch.Tensor  # where the select set sits in the concatenated pool
    test_positions: torch.Tensor | None
    label: str  # "ChEBI-20" or "provisional (validation re-split)"
    # Text2Mol's text -> molecule pool (molecules.tsv: all 33,010 ChEBI-20 molecules); None without
    # that file (the molecules of the splits present are the pool instead)
    candidates: MoleculeTextDataset | None = None
    # every split that can be evaluated: name -> (pairs, positions in the text pool, positions of their
    # molecules in `candidates` or None); "select" is what runs select on
    query_sets: dict = field(default_factory=dict)
    # what `fit` is made of: corpus name -> {"pairs": n, ...} (written into metrics.json and model directories)
    corpora: dict = field(default_factory=dict)
    fit_sources: list = field(default_factory=list)  # the datasets `fit` draws from (their texts get cached states)

    def queries(self, which: str) -> tuple[Dataset, torch.Tensor, torch.Tensor | None]:
        """(pairs, their positions in the pool, their molecules' positions in `candidates`)."""
        if which not in self.query_sets:
            raise ValueError(f"no {which!r} split in {self.label} (present: {sorted(self.query_sets)})")
        return self.query_sets[which]


def _offsets(datasets: list[MoleculeTextDataset]) -> list[int]:
    out, total = [], 0
    for dataset in datasets:
        out.append(total)
        total += len(dataset)
    return out


def load_splits(root: str | Path, cache_dir: str | Path | None = None, max_train_pairs: int | None = None,
                seed: int = 42, corpus=None, progress: bool = True) -> Splits:
    """The splits of a data root; `corpus` (a CorpusConfig) says what the fit set is made of."""
    files = available_splits(Path(root))
    if "validation" not in files:
        raise FileNotFoundError(f"{root}: no validation.txt (tmr selects models on validation); give the data root "
                                "with --data or $TMR_DATA (a `ray job submit --working-dir` copy of the code does "
                                "not see ../shared beside the checkout)")
    # the candidate pool first: it holds every molecule of the splits and of the derived corpus, which reuse its graphs
    candidates = (MoleculeTextDataset(Path(root) / CANDIDATE_POOL, cache_dir, require_text=False, progress=progress)
                  if (Path(root) / CANDIDATE_POOL).exists() else None)
    loaded = {name: MoleculeTextDataset(path, cache_dir, progress=progress, reuse=candidates)
              for name, path in files.items()}
    pool = [loaded[name] for name in ("train", "validation", "test") if name in loaded]
    offset = dict(zip([n for n in ("train", "validation", "test") if n in loaded], _offsets(pool)))
    validation = loaded["validation"]
    if "train" in loaded:
        fit: Dataset = loaded["train"]
        select: Dataset = validation
        select_positions = offset["validation"] + torch.arange(len(validation))
        label = "ChEBI-20"
    else:
        n_select = min(PROVISIONAL_SELECT, len(validation) // 5)  # small user files: a fifth
        log.warning("no train.txt: fitting on a provisional re-split of validation (%d to fit, %d to select on)",
                    len(validation) - n_select, n_select)
        order = torch.randperm(len(validation), generator=torch.Generator().manual_seed(PROVISIONAL_SEED))
        fit_idx, select_idx = order[n_select:].sort().values, order[:n_select].sort().values
        fit, select = Subset(validation, fit_idx.tolist()), Subset(validation, select_idx.tolist())
        select_positions = offset["validation"] + select_idx
        label = "provisional (validation re-split)"
    real_name = "chebi20 train.txt" if "train" in loaded else "chebi20 validation re-split (fit part)"
    parts, corpora, sources = [], {}, []
    if corpus is None or corpus.real:
        repeat = max(1, getattr(corpus, "real_repeat", 1))
        parts += [fit] * repeat
        corpora[real_name] = {"pairs": len(fit), "repeat": repeat}
        sources.append(loaded["train"] if "train" in loaded else validation)
    if corpus is not None and corpus.ontology:
        derived, report = ontology_dataset(Path(root), corpus, _dataset_ids(fit), cache_dir, progress, candidates)
        parts.append(derived)
        corpora["chebi ontology (derived)"] = report
        sources.append(derived)
    if not parts:
        raise ValueError("nothing to fit on: corpus.real and corpus.ontology are both off")
    fit = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    if max_train_pairs is not None and max_train_pairs < len(fit):
        keep = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))[:max_train_pairs]
        fit = Subset(fit, keep.sort().values.tolist())
    test = loaded.get("test")
    test_positions = offset["test"] + torch.arange(len(test)) if test is not None else None
    splits = Splits(fit, select, test, pool, select_positions, test_positions, label, corpora=corpora,
                    fit_sources=sources)
    named = {"select": (select, select_positions)}
    named.update({name: (loaded[name], offset[name] + torch.arange(len(loaded[name]))) for name in offset})
    where = None
    if candidates is not None:
        splits.candidates = candidates
        where = {cid: i for i, cid in enumerate(splits.candidates.ids)}
    for name, (dataset, positions) in named.items():
        in_pool = _positions_in_pool(dataset, where, root) if where is not None else None
        splits.query_sets[name] = (dataset, positions, in_pool)
    return splits


def ontology_dataset(root: Path, corpus, fit_ids: list[str], cache_dir: str | Path | None = None,
                     progress: bool = True, reuse: MoleculeTextDataset | None = None) -> tuple[MoleculeTextDataset, dict]:
    """Derived descriptions of the train split's molecules (and, if asked, of the real fit pairs'), with
    every molecule of the data root that is not one of those held out by CID and by InChIKey."""
    from tmr.data.ontology import build_ontology_corpus, read_cids, read_molecules, resolve_ontology_root

    needed = [str(root / name) for name in missing_corpus_files(root)]
    if needed:
        raise FileNotFoundError(f"corpus.ontology needs {', '.join(needed)} (../shared/data/chebi20 "
                                "has both); give a data root that holds them, or set corpus.ontology=false")
    molecules = read_molecules(root / CANDIDATE_POOL)
    train = read_cids(root / TRAIN_CIDS)
    allowed = train + (list(fit_ids) if corpus.ontology_fit_texts else [])
    # held out: every ChEBI-20 molecule that is neither a train-split molecule nor a real fit pair's
    fit_or_train = set(train) | set(fit_ids)
    held_out = [cid for cid in molecules if cid not in fit_or_train]
    path, report = build_ontology_corpus(resolve_ontology_root(corpus.ontology_path, root), molecules, allowed,
                                         held_out, cache_dir, progress,
                                         name_share=getattr(corpus, "ontology_names", 0.0))
    dataset = MoleculeTextDataset(path, cache_dir, progress=progress, reuse=reuse)
    return dataset, {**report, "pairs": len(dataset), "file": path.name}


def _dataset_ids(dataset: Dataset) -> list[str]:
    if isinstance(dataset, Subset):
        return [dataset.dataset.ids[i] for i in dataset.indices]
    return list(dataset.ids)


def _positions_in_pool(dataset: Dataset, where: dict[str, int], root: str | Path) -> torch.Tensor:
    ids = _dataset_ids(dataset)
    missing = [cid for cid in ids if cid not in where]
    if missing:
        raise ValueError(f"{Path(root) / CANDIDATE_POOL} lacks {len(missing)} evaluated molecule(s) (e.g. CID "
                         f"{missing[:5]}): it is not the candidate pool of this data; fix or remove it")
    return torch.tensor([where[cid] for cid in ids])
