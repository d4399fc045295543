"""Featurisation of known molecules, bad input reported and skipped, user files, split selection."""

from pathlib import Path

import pytest
import torch

from tmr.data import InvalidMolecule, MoleculeTextDataset, featurize, load_splits, read_pairs, resolve_data_root
from tmr.data.featurize import featurize_or_error


def test_ethanol_graph():
    graph = featurize("OCC")
    assert graph.num_nodes == 3
    assert graph.edge_index.shape == (2, 4)  # two bonds, both directions
    assert graph.smiles == "CCO"  # canonical
    assert graph.x.shape == (3, 9) and graph.edge_attr.shape == (4, 3)  # PyG's atom / bond categories
    assert graph.x[:, 0].tolist() == [8, 6, 6]  # atomic numbers
    assert graph.morgan.shape == (3,) and graph.morgan.dtype == torch.long


def test_benzene_is_aromatic_and_kekule_forms_agree():
    aromatic, kekule = featurize("c1ccccc1"), featurize("C1=CC=CC=C1")
    assert aromatic.smiles == kekule.smiles == "c1ccccc1"
    assert torch.equal(aromatic.x, kekule.x) and torch.equal(aromatic.edge_attr, kekule.edge_attr)
    assert torch.equal(aromatic.morgan, kekule.morgan)
    assert len(set(aromatic.morgan.tolist())) == 1  # six identical atom environments


def test_morgan_identifiers_are_found_in_the_mol2vec_table(chebi_root):
    import numpy as np

    keys = set(np.load(chebi_root.parent / "mol2vec" / "tokens.npz")["keys"].tolist())
    ids = featurize("CC(C)Cc1ccc(cc1)C(C)C(=O)O").morgan.tolist()  # ibuprofen
    assert sum(str(i) in keys for i in ids) == len(ids)


@pytest.mark.parametrize("bad", ["C1CC", "not a smiles", "", "   ", "C(C)(C)(C)(C)C"])
def test_invalid_smiles_raises_a_clear_error(bad):
    with pytest.raises(InvalidMolecule, match="SMILES|unsupported|empty"):
        featurize(bad)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_with_bad_rows_is_read_and_reports_them(tmp_path):
    path = write(tmp_path / "pairs.txt", "CID\tSMILES\tdescription\n1\tCCO\tThe molecule is ethanol.\n"
                 "2\tC1CC\tA broken ring.\n3\tCC(=O)O\t\n4\tc1ccccc1\tThe molecule is benzene.\n")
    pairs, report = read_pairs(path)
    assert [p.id for p in pairs] == ["1", "2", "4"]  # SMILES are checked by the dataset, texts here
    assert [sid for sid, _ in report.skipped] == ["3"]
    dataset = MoleculeTextDataset(path, cache_dir=tmp_path / "cache", progress=False)
    assert dataset.ids == ["1", "4"] and dataset.texts[1] == "The molecule is benzene."
    assert sorted(sid for sid, _ in dataset.skipped) == ["2", "3"]
    assert any("C1CC" in reason for _, reason in dataset.skipped)


def test_csv_with_other_column_names(tmp_path):
    path = write(tmp_path / "mine.csv", 'id,smiles,text\nA,CCO,"ethanol, a solvent"\nB,CCN,ethylamine\n')
    pairs, report = read_pairs(path)
    assert [(p.id, p.smiles, p.text) for p in pairs] == [("A", "CCO", "ethanol, a solvent"), ("B", "CCN", "ethylamine")]
    assert not report.skipped


def test_bare_smiles_file_for_libraries(tmp_path):
    pairs, _ = read_pairs(write(tmp_path / "lib.smi", "CCO\nc1ccccc1\n\n"), require_text=False)
    assert [p.smiles for p in pairs] == ["CCO", "c1ccccc1"]


def test_data_root_precedence(tmp_path, monkeypatch, chebi_root):
    monkeypatch.setenv("TMR_DATA", str(tmp_path))
    assert resolve_data_root(str(chebi_root)) == chebi_root.resolve()  # the flag wins
    assert resolve_data_root() == tmp_path.resolve()  # then $TMR_DATA
    monkeypatch.delenv("TMR_DATA")
    assert resolve_data_root(download=False).name == "chebi20"  # then ../shared beside the checkout


def test_provisional_resplit_when_train_is_missing(chebi_root):
    splits = load_splits(chebi_root)
    if (chebi_root / "train.txt").exists():
        pytest.skip("train.txt is present: the provisional re-split is not used")
    assert splits.label == "provisional (validation re-split)"
    assert (len(splits.fit), len(splits.select)) == (2801, 500)
    assert set(splits.fit.indices).isdisjoint(splits.select.indices)
    assert splits.test is None and sum(len(d) for d in splits.pool) == 3301
    again = load_splits(chebi_root, seed=7)  # the re-split is fixed, whatever the run's seed
    assert again.select.indices == splits.select.indices


def test_train_file_is_picked_up_when_it_appears(tmp_path, small_root):
    lines = (small_root / "validation.txt").read_text().splitlines()
    write(tmp_path / "validation.txt", "\n".join(lines[:61]) + "\n")
    write(tmp_path / "train.txt", "\n".join([lines[0]] + lines[61:]) + "\n")
    splits = load_splits(tmp_path, cache_dir=tmp_path / "cache")
    assert splits.label == "ChEBI-20"
    assert (len(splits.fit), len(splits.select)) == (60, 60)
    assert splits.select_positions.tolist() == list(range(60, 120))  # pool order: train, validation, test


def test_molecules_tsv_is_the_text_to_molecule_pool(tmp_path, small_root, chebi_root):
    """A data root's molecules.tsv (Text2Mol's 33,010) is the text -> molecule pool; each query's gold
    is its own CID there; a file that lacks an evaluated CID is refused with the reason."""
    import torch

    from tmr.config import load_config
    from tmr.model import create_model
    from tmr.train import evaluate

    root = tmp_path / "root"
    root.mkdir()
    (root / "validation.txt").write_text((small_root / "validation.txt").read_text())
    header, *rows = (chebi_root / "molecules.tsv").read_text().splitlines()
    ours = {line.split("\t")[0] for line in (small_root / "validation.txt").read_text().splitlines()[1:]}
    ours_rows = [r for r in rows if r.split("\t")[0] in ours]
    others = [r for r in rows[:400] if r.split("\t")[0] not in ours][:80]
    (root / "molecules.tsv").write_text("\n".join([header] + others + ours_rows) + "\n")
    splits = load_splits(root)
    assert len(splits.candidates) == 80 + 120
    dataset, _, gold = splits.queries("select")
    assert [splits.candidates.ids[g] for g in gold.tolist()] == [dataset[i].id for i in range(len(dataset))]
    model = create_model(load_config("tiny").model)
    full = evaluate(model, splits, pools=("all",))["all"]
    assert full["text_to_molecule"]["pool"] == 200 and full["molecule_to_text"]["pool"] == 120
    assert torch.is_tensor(gold) and full["queries"] == len(dataset) == 24

    (root / "molecules.tsv").write_text("\n".join([header] + others + ours_rows[1:]) + "\n")
    with pytest.raises(ValueError, match="lacks 1 evaluated molecule"):
        load_splits(root)


def test_mol2vec_table_resolves_like_the_data_root(tmp_path, monkeypatch, chebi_root):
    """Flag, then $TMR_MOL2VEC, then ../shared of the working directory; Text2Mol's pickled table is
    converted to a pickle-free npz with the same keys and vectors, and anything but arrays is refused."""
    import io
    import pickle

    import numpy as np

    from tmr.data.sources import convert_text2mol_table, resolve_mol2vec

    shared = chebi_root.parent / "mol2vec/tokens.npz"
    monkeypatch.delenv("TMR_MOL2VEC", raising=False)
    monkeypatch.chdir(chebi_root.parents[2])  # the directory holding shared/, as a user's working directory
    assert resolve_mol2vec(download=False) == shared.resolve()
    table = np.load(shared)
    buffer = io.BytesIO()
    np.save(buffer, dict(zip(table["keys"], table["vectors"])), allow_pickle=True)  # Text2Mol's format
    converted = convert_text2mol_table(buffer.getvalue(), tmp_path / "tokens.npz")
    again = np.load(converted)  # allow_pickle=False
    assert (again["keys"] == table["keys"]).all() and np.array_equal(again["vectors"], table["vectors"])
    monkeypatch.setenv("TMR_MOL2VEC", str(converted))
    assert resolve_mol2vec() == converted.resolve()
    assert resolve_mol2vec(shared) == shared.resolve()  # an explicit path wins
    with pytest.raises(FileNotFoundError):
        resolve_mol2vec(tmp_path / "missing.npz")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = io.BytesIO()
    np.save(evil, np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        convert_text2mol_table(evil.getvalue(), tmp_path / "evil.npz")


def test_fast_featurisation_equals_pyg_from_rdmol_and_its_batches(chebi_root):
    """`graph_batch` (what index builds and `featurize` use) gives exactly PyG's `from_rdmol` graphs
    and `Batch.from_data_list`, on every ChEBI-20 molecule (odd charges, metals, stereo) and MOSES
    drug-like ones; a molecule outside PyG's vocabularies is rejected by both, with the reason."""
    import gzip

    from rdkit import Chem
    from torch_geometric.data import Batch
    from torch_geometric.utils import from_rdmol

    from tmr.data.featurize import ParsedMolecule, featurize_parsed, graph_batch

    pool = chebi_root / "molecules.tsv"
    smiles = [line.split("\t")[1] for line in pool.read_text().splitlines()[1:]]
    with gzip.open(chebi_root.parent / "moses" / "train.csv.gz", "rt") as handle:
        smiles += [line.strip() for _, line in zip(range(2001), handle)][1:]
    mols = [mol for mol in map(Chem.MolFromSmiles, smiles) if mol is not None]
    for mol in mols:
        graph, kept, rejected = graph_batch([mol])
        try:
            reference = from_rdmol(mol)
        except ValueError:
            assert kept == [] and "outside PyG's vocabulary" in rejected[0]
            continue
        assert kept == [0] and not rejected
        assert torch.equal(graph.x, reference.x) and torch.equal(graph.edge_index, reference.edge_index)
        assert torch.equal(graph.edge_attr, reference.edge_attr)
    assert len(mols) > 30_000

    part = mols[-300:] + [Chem.MolFromSmiles("[Fe+12]")]  # a charge outside PyG's vocabulary
    batch, kept, rejected = graph_batch(part)
    assert kept == list(range(300)) and list(rejected) == [300]
    reference = Batch.from_data_list([featurize_parsed(ParsedMolecule(m, ""), "") for m in part[:300]])
    for key in ("x", "edge_index", "edge_attr", "morgan", "batch", "ptr"):
        assert torch.equal(getattr(batch, key), getattr(reference, key)), key
    assert batch.num_graphs == 300
    with pytest.raises(InvalidMolecule, match="outside PyG's vocabulary"):
        featurize("[Fe+12]")


CONCURRENT_BUILD = """
import sys, time
from pathlib import Path
from tmr.data import MoleculeTextDataset

source, cache, ready, go = sys.argv[1:]
featurised = []
process = MoleculeTextDataset.process
MoleculeTextDataset.process = lambda self: (featurised.append(1), process(self))[1]
Path(ready).touch()
while not Path(go).exists():  # start together, imports done
    time.sleep(0.01)
dataset = MoleculeTextDataset(source, cache_dir=cache, progress=False)
print(len(featurised), len(dataset), dataset.ids[-1])
"""


def test_side_by_side_processes_featurise_a_shared_cache_once(tmp_path, chebi_root):
    """Side-by-side Tune trials build the same cache on a fresh machine: one featurises, the others
    wait and load it (before: each featurised and one loaded a graphs.pt another was rewriting)."""
    import subprocess
    import sys
    import time

    lines = (chebi_root / "validation.txt").read_text(encoding="utf-8").splitlines()[:1201]
    source = write(tmp_path / "pairs.txt", "\n".join(lines) + "\n")
    workers = []
    for i in range(3):
        args = [str(source), str(tmp_path / "cache"), str(tmp_path / f"ready{i}"), str(tmp_path / "go")]
        workers.append(subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), workers[0].communicate()
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    reports = [out.split() for out, _ in outputs]
    assert sorted(int(r[0]) for r in reports) == [0, 0, 1]  # featurised by exactly one process
    assert len({(r[1], r[2]) for r in reports}) == 1 and int(reports[0][1]) > 1100


def test_a_dataset_reuses_the_pools_graphs_and_equals_one_featurised_afresh(tmp_path, small_root, chebi_root,
                                                                             monkeypatch):
    """The splits copy the graphs of molecules the candidate pool already holds (same SMILES string)
    instead of featurising them again; the result is the dataset featurised from scratch, and only the
    molecules the pool lacks are featurised."""
    import torch

    import tmr.data.dataset as dataset_module
    from tmr.data.dataset import MoleculeTextDataset

    header, *rows = (chebi_root / "molecules.tsv").read_text().splitlines()
    pairs = (small_root / "validation.txt").read_text().splitlines()[1:]
    ours = [line.split("\t")[0] for line in pairs]
    by_id = {r.split("\t")[0]: r for r in rows}
    pool_rows = [r for r in rows[:300] if r.split("\t")[0] not in ours][:80] + [by_id[cid] for cid in ours[20:]]
    pool = MoleculeTextDataset(write(tmp_path / "molecules.tsv", "\n".join([header] + pool_rows) + "\n"),
                               tmp_path / "cache", require_text=False, progress=False)
    afresh = MoleculeTextDataset(small_root / "validation.txt", tmp_path / "cache_afresh", progress=False)
    featurised = []
    monkeypatch.setattr(dataset_module, "featurize_or_error",
                        lambda smiles: featurised.append(smiles) or featurize_or_error(smiles))
    reused = MoleculeTextDataset(small_root / "validation.txt", tmp_path / "cache", progress=False, reuse=pool)
    assert len(featurised) == 20  # the 20 molecules the pool lacks
    assert reused.ids == afresh.ids == ours and reused.texts == afresh.texts
    for key in ("x", "edge_index", "edge_attr", "morgan"):
        assert torch.equal(getattr(reused._data, key), getattr(afresh._data, key)) and reused.slices[key].equal(
            afresh.slices[key]), key
    assert list(reused._data.smiles) == list(afresh._data.smiles)


def test_parallel_map_on_ray_equals_the_serial_map(local_ray, chebi_root):
    """With Ray running (a training driver), featurising and InChI-keying go to Ray tasks in chunks:
    the same results, in the same order, failures returned in place. Inside a task that holds every
    CPU (a training worker on a node whose cache is cold) it runs in place rather than wait forever."""
    import ray

    from tmr.data import parallel
    from tmr.data.ontology import _inchikey

    smiles = [line.split("\t")[1] for line in (chebi_root / "molecules.tsv").read_text().splitlines()[1:2201]]
    smiles[5] = "not a SMILES"
    on_ray = parallel.parallel_map(featurize_or_error, smiles, "featurising", progress=False)
    assert isinstance(on_ray[5], str) and "cannot parse" in on_ray[5]
    serial = [featurize_or_error(s) for s in smiles]
    assert [g if isinstance(g, str) else (g.smiles, g.x.tolist(), g.edge_index.tolist(), g.morgan.tolist())
            for g in on_ray] == [g if isinstance(g, str) else (g.smiles, g.x.tolist(), g.edge_index.tolist(),
                                                              g.morgan.tolist()) for g in serial]
    keys = [_inchikey(s) for s in smiles]
    assert parallel.parallel_map(_inchikey, smiles, "InChIKeys", progress=False) == keys
    in_a_worker = ray.remote(num_cpus=2)(parallel.parallel_map).remote(_inchikey, smiles, "InChIKeys", False)
    assert ray.get(in_a_worker, timeout=300) == keys
