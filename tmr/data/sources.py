"""Where the data comes from: data-root and Mol2vec resolution, verified downloads, pair files.

Root resolution order: explicit `--data`, then `$TMR_DATA`, then `../shared/data/chebi20` (beside
the checkout or the working directory) when present, else the public MolT5 files downloaded into
`~/.cache/tmr/chebi20` and checked against their sha256 (or git blob sha1 where the sha256 is not
published yet). A split that is not there is reported, never faked. A root may also hold
`molecules.tsv` (CID, SMILES: all 33,010 ChEBI-20 molecules), Text2Mol's text -> molecule pool.

The Mol2vec table resolves the same way: `model.molecule.mol2vec_path`, `$TMR_MOL2VEC`,
`<data root>/../mol2vec/tokens.npz`, `../shared/data/mol2vec/tokens.npz`, else Text2Mol's table downloaded, checked against its
sha256 and converted to a pickle-free npz under `~/.cache/tmr/mol2vec/`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tmr.atomic import atomic_file

log = logging.getLogger("tmr.data")

SPLITS = ("train", "validation", "test")
URL = "https://raw.githubusercontent.com/blender-nlp/MolT5/main/ChEBI-20_data/{split}.txt"
# From ../shared/data/PROVENANCE.md: sha256 where known, else the git blob sha1 at the pinned commit.
CHECKSUMS = {
    "train": ("git-blob-sha1", "c1b42b82fdc8fb5287614e159196e25370763aac"),
    "validation": ("sha256", "f410b58e6825986577d01b4f0c14b59ed61c1343a15118ba584de4bbcea1508c"),
    "test": ("sha256", "91776254b54ef13ad701ede0ecdbd7bcd30c19a66e52aa34a6dac8d0e7306d72"),
}
CACHE = Path(os.environ.get("TMR_CACHE", Path.home() / ".cache" / "tmr"))


MOL2VEC_URL = "https://raw.githubusercontent.com/cnedwards/text2mol/master/data/token_embedding_dict.npy"
MOL2VEC_SHA256 = "da4fe9f0a97db2948abf172cefc483708d718cfdfb558df1ed32e659dd6594a3"  # PROVENANCE.md
CANDIDATE_POOL = "molecules.tsv"
TRAIN_CIDS = "train_cids.txt"  # the train split's molecules (PROVENANCE.md): the only ones a derived text may describe


def missing_corpus_files(root: str | os.PathLike) -> list[str]:
    """What corpus.ontology needs in a data root and the root lacks (molecules.tsv, train_cids.txt)."""
    return [name for name in (CANDIDATE_POOL, TRAIN_CIDS) if not (Path(root) / name).exists()]


def _shared_candidates(name: str = "chebi20") -> list[Path]:
    """`../shared/data/<name>` beside the working directory (and beside an editable checkout)."""
    checkout = Path(__file__).resolve().parents[2]
    return [Path.cwd().parent / "shared/data" / name, Path.cwd() / "shared/data" / name,
            checkout.parent / "shared/data" / name]


def resolve_data_root(data: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The directory holding `{train,validation,test}.txt`, by the order in the module docstring."""
    if data:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist")
        return root.resolve()
    if os.environ.get("TMR_DATA"):
        return resolve_data_root(os.environ["TMR_DATA"])
    for candidate in _shared_candidates():
        if any((candidate / f"{split}.txt").exists() for split in SPLITS):
            return candidate.resolve()
    root = CACHE / "chebi20"
    if download:
        for split in SPLITS:
            try:
                download_split(split, root)
            except OSError as error:
                log.warning("could not download ChEBI-20 %s: %s", split, error)
    return root


def resolve_mol2vec(path: str | os.PathLike | None = None, download: bool = True,
                    data_root: str | os.PathLike | None = None) -> Path:
    """The Mol2vec `tokens.npz`, by the order in the module docstring."""
    if path:
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"Mol2vec table {path} does not exist")
        return Path(path).expanduser().resolve()
    if os.environ.get("TMR_MOL2VEC"):
        return resolve_mol2vec(os.environ["TMR_MOL2VEC"])
    beside = [Path(data_root).expanduser().parent / "mol2vec"] if data_root else []  # ../shared/data's layout
    for candidate in beside + _shared_candidates("mol2vec"):
        if (candidate / "tokens.npz").is_file():
            return (candidate / "tokens.npz").resolve()
    target = CACHE / "mol2vec" / "tokens.npz"
    if not target.exists():
        if not download:
            raise FileNotFoundError("no Mol2vec table: set model.molecule.mol2vec_path or $TMR_MOL2VEC")
        log.info("downloading Text2Mol's Mol2vec table from %s", MOL2VEC_URL)
        try:
            with urllib.request.urlopen(MOL2VEC_URL, timeout=120) as response:
                data = response.read()
        except OSError as error:
            raise OSError(f"no Mol2vec table found, and downloading it from {MOL2VEC_URL} failed ({error})") from None
        if file_digest(data, "sha256") != MOL2VEC_SHA256:
            raise OSError(f"Mol2vec table: sha256 mismatch (expected {MOL2VEC_SHA256}); not saved")
        convert_text2mol_table(data, target)
    return target


class InputError(ValueError):
    """A run's input that cannot be found or fetched: the message names the flag or variable that fixes it."""


def resolve_run_inputs(config):
    """Resolve every path a run reads, once, in the driver: data root, Mol2vec table, ChEBI ontology, a
    local text model. The config comes back with absolute paths, so workers (in a `ray job submit`
    copy of the code, or on other nodes) read exactly these and never fall back to a download of
    their own. A missing file or a failed download raises InputError naming the fix."""
    from tmr.config import DEFAULT_TEXT_MODEL, check_config

    check_config(config)
    explicit = bool(config.data or os.environ.get("TMR_DATA"))
    try:
        config.data = str(resolve_data_root(config.data))
    except FileNotFoundError as error:
        raise InputError(f"{error}: give the ChEBI-20 folder with --data or $TMR_DATA") from None
    if not (Path(config.data) / "validation.txt").exists():
        how = "" if explicit else " (none beside the working directory, and the download failed)"
        raise InputError(f"no ChEBI-20 validation.txt in {config.data}{how}: give the folder that holds it with "
                         "--data or $TMR_DATA")
    mol = config.model.molecule
    if mol.kind == "gcn_mol2vec" or mol.mol2vec_features:
        try:
            mol.mol2vec_path = str(resolve_mol2vec(mol.mol2vec_path, data_root=config.data))
        except OSError as error:  # missing file, or a download that failed (offline) or did not verify
            raise InputError(f"{error}; set model.molecule.mol2vec_path=<tokens.npz> or $TMR_MOL2VEC "
                             f"(or put it at {Path(config.data).parent / 'mol2vec/tokens.npz'})") from None
    if config.corpus.ontology:
        from tmr.data.ontology import resolve_ontology_root

        needed = missing_corpus_files(config.data)
        if needed:
            raise InputError(f"corpus.ontology needs {' and '.join(needed)} in the data root {config.data} "
                             "(../shared/data/chebi20 has both): give such a root with --data, or set "
                             "corpus.ontology=false to fit on its real pairs alone")
        try:
            config.corpus.ontology_path = str(resolve_ontology_root(config.corpus.ontology_path, config.data))
        except OSError as error:
            raise InputError(f"ChEBI ontology: {error}; set corpus.ontology_path=<chebi_ontology dir> or "
                             f"$TMR_ONTOLOGY (or put it at {Path(config.data).parent / 'chebi_ontology'}), or "
                             "corpus.ontology=false") from None
    text = config.model.text
    if text.name != DEFAULT_TEXT_MODEL and Path(text.name).expanduser().exists():
        text.name = str(Path(text.name).expanduser().resolve())  # a local model: absolute for the workers
    return config


def input_overrides(config, mol2vec: bool = False) -> list[str]:
    """`resolve_run_inputs` as `key=value` overrides, for Tune trials that rebuild their own config;
    `mol2vec`: resolve the Mol2vec table even if this config does not use it (a sweep may turn it on)."""
    import copy

    resolved = copy.deepcopy(config)
    if mol2vec:
        resolved.model.molecule.mol2vec_features = True
    resolved = resolve_run_inputs(resolved)
    out = [f"data={resolved.data}"]
    if resolved.model.molecule.mol2vec_path:
        out.append(f"model.molecule.mol2vec_path={resolved.model.molecule.mol2vec_path}")
    if resolved.corpus.ontology_path:
        out.append(f"corpus.ontology_path={resolved.corpus.ontology_path}")
    if resolved.model.text.name != config.model.text.name:
        out.append(f"model.text.name={resolved.model.text.name}")
    return out


def convert_text2mol_table(data: bytes, target: Path) -> Path:
    """Text2Mol's `token_embedding_dict.npy` (a pickled {identifier: vector} dict) -> tokens.npz.

    The pickle is read by an unpickler that admits numpy arrays and nothing else, then written as
    plain arrays (`keys`, `vectors`) that load without pickle; atomically.
    """
    import io
    import pickle

    import numpy as np

    class ArraysOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the Mol2vec table")

    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    read_header(stream)  # an object array: the pickle follows the header
    table = ArraysOnly(stream).load()
    table = table.item() if isinstance(table, np.ndarray) else table
    keys = [str(k) for k in table]
    vectors = np.stack([np.asarray(table[k], dtype=np.float32).reshape(-1) for k in table])
    with atomic_file(target) as partial:
        np.savez(partial, keys=np.array(keys), vectors=vectors)
    return target


def file_digest(data: bytes, kind: str) -> str:
    if kind == "sha256":
        return hashlib.sha256(data).hexdigest()
    if kind == "git-blob-sha1":
        return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()
    raise ValueError(kind)


def download_split(split: str, root: Path) -> Path:
    """Fetch one public split file, verify its checksum, and move it into place atomically."""
    target = root / f"{split}.txt"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("downloading ChEBI-20 %s from %s", split, URL.format(split=split))
    with urllib.request.urlopen(URL.format(split=split), timeout=60) as response:
        data = response.read()
    kind, expected = CHECKSUMS[split]
    if file_digest(data, kind) != expected:
        raise OSError(f"ChEBI-20 {split}: {kind} mismatch (expected {expected}); not saved")
    with atomic_file(target) as partial:  # private to this process: workers may fetch it at once
        partial.write_bytes(data)
    return target


def available_splits(root: Path) -> dict[str, Path]:
    """The split files present under root; missing ones are logged."""
    found = {s: root / f"{s}.txt" for s in SPLITS if (root / f"{s}.txt").exists()}
    missing = [s for s in SPLITS if s not in found]
    if missing:
        log.warning("ChEBI-20 at %s: missing split(s) %s; working with %s", root, missing, sorted(found))
    return found


@dataclass
class Pair:
    id: str
    smiles: str
    text: str


@dataclass
class ReadReport:
    path: str
    rows: int = 0
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    id_column: str | None = None  # the header's id column ("cid" in ChEBI-20's files), if any

    def log(self) -> None:
        if self.skipped:
            shown = ", ".join(f"{i} ({r})" for i, r in self.skipped[:10])
            log.warning("%s: skipped %d of %d rows: %s%s", self.path, len(self.skipped), self.rows,
                        shown, " ..." if len(self.skipped) > 10 else "")


_ID = ("cid", "id", "name", "identifier")
_SMILES = ("smiles", "canonical_smiles")
_TEXT = ("description", "text", "caption")


def open_text(path: str | os.PathLike):
    """A text file, gunzipped on the fly when its name ends in .gz."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return open(path, newline="", encoding="utf-8")


def read_pairs(path: str | os.PathLike, require_text: bool = True, limit: int | None = None) -> tuple[list[Pair], ReadReport]:
    """Read (id, smiles, text) rows from a TSV/CSV with a header, or a bare SMILES-per-line file
    (SMILES, then an optional id after a tab, comma or space), gzipped or not; the first `limit`
    rows when given. Rows with no SMILES (or, when `require_text`, no text) are reported and
    skipped; SMILES are checked later, by featurisation. Rows without an id get `row<N>`.
    """
    path = Path(path)
    report = ReadReport(str(path))
    with open_text(path) as handle:
        head = handle.readline()
        delimiter = "\t" if "\t" in head else "," if "," in head else " "
        columns = [c.strip().lower() for c in head.rstrip("\r\n").split(delimiter)]
        has_header = any(c in _SMILES for c in columns)
        handle.seek(0)
        rows = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        if has_header:
            next(rows)
            pick = lambda names: next((columns.index(n) for n in names if n in columns), None)  # noqa: E731
            id_col, smiles_col, text_col = pick(_ID), pick(_SMILES), pick(_TEXT)
            report.id_column = columns[id_col] if id_col is not None else None
        else:  # bare file: smiles [id] per line
            id_col, smiles_col, text_col = (1 if delimiter in head else None), 0, None
        if require_text and text_col is None:
            raise ValueError(f"{path}: no text column (expected one of {_TEXT}) in header {columns}")
        pairs = []
        for number, row in enumerate(rows, start=1):
            if not row or not any(cell.strip() for cell in row):
                continue
            if limit is not None and report.rows >= limit:
                break
            report.rows += 1
            get = lambda col: row[col].strip() if col is not None and col < len(row) else ""  # noqa: E731
            pair = Pair(get(id_col) or f"row{number}", get(smiles_col), get(text_col))
            if not pair.smiles:
                report.skipped.append((pair.id, "empty SMILES"))
            elif require_text and not pair.text:
                report.skipped.append((pair.id, "empty text"))
            else:
                pairs.append(pair)
    report.kept = len(pairs)
    report.log()
    return pairs, report
