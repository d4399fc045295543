"""Properties, filters, depictions and exports (tmr.chem) against RDKit and hand-checked values."""

import pytest
from rdkit import Chem
from rdkit.Chem import Descriptors

from tmr.chem import (InvalidFilter, MoleculeFilter, depict_svg, molfile_to_smiles, properties, results_csv,
                      results_sdf, tanimoto)

ASPIRIN, IBUPROFEN, CYCLOSPORIN = "CC(=O)Oc1ccccc1C(=O)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", (
    "CC[C@H]1C(=O)N(CC(=O)N([C@H](C(=O)N[C@H](C(=O)N([C@H](C(=O)N[C@H](C(=O)N[C@@H](C(=O)N([C@H](C(=O)N([C@H]"
    "(C(=O)N([C@H](C(=O)N([C@H](C(=O)N1)[C@@H]([C@H](C)C/C=C/C)O)C)C(C)C)C)CC(C)C)C)CC(C)C)C)C)C)CC(C)C)C)C(C)C)CC(C)C)C)C")


def test_properties_match_rdkit_descriptors_and_known_values():
    for smiles in (ASPIRIN, IBUPROFEN, CYCLOSPORIN, "c1ccccc1O"):
        mol, values = Chem.MolFromSmiles(smiles), properties(smiles)
        assert values["mw"] == pytest.approx(Descriptors.MolWt(mol), abs=1e-3)
        assert values["clogp"] == pytest.approx(Descriptors.MolLogP(mol), abs=1e-3)
        assert values["tpsa"] == pytest.approx(Descriptors.TPSA(mol), abs=1e-3)
        assert (values["hbd"], values["hba"]) == (Descriptors.NumHDonors(mol), Descriptors.NumHAcceptors(mol))
        assert values["rotatable_bonds"] == Descriptors.NumRotatableBonds(mol)
    aspirin = properties(ASPIRIN)  # PubChem CID 2244: MW 180.16, TPSA 63.6, 1 donor, 4 acceptors (RDKit counts 3)
    assert aspirin["mw"] == pytest.approx(180.159, abs=0.01) and aspirin["tpsa"] == pytest.approx(63.6, abs=0.05)
    assert aspirin["hbd"] == 1 and aspirin["lipinski"] and aspirin["lipinski_violations"] == 0
    assert properties(IBUPROFEN)["mw"] == pytest.approx(206.28, abs=0.01)
    cyclosporin = properties(CYCLOSPORIN)  # MW 1202.6: the classic rule-of-five failure
    assert cyclosporin["mw"] == pytest.approx(1202.6, abs=0.1)
    assert not cyclosporin["lipinski"] and cyclosporin["lipinski_violations"] >= 2
    assert properties("C1CC") == {}


def test_filter_ranges_lipinski_and_smarts():
    acid = MoleculeFilter({"mw": (150, 200)}, smarts="C(=O)[OX2H1]")
    assert acid.active and acid.accepts(ASPIRIN) and not acid.accepts(IBUPROFEN)  # ibuprofen: MW 206
    assert MoleculeFilter({"mw": (None, 210)}).accepts(IBUPROFEN)
    assert MoleculeFilter(lipinski=False).accepts(CYCLOSPORIN) and not MoleculeFilter(lipinski=True).accepts(CYCLOSPORIN)
    assert not MoleculeFilter(smarts="[N+](=O)[O-]").accepts(ASPIRIN)
    assert not MoleculeFilter().active and not MoleculeFilter({"mw": (1, 1e9)}).accepts("C1CC")
    for bad, message in (({"weight": (0, 1)}, "unknown property"), ({"mw": (5, 1)}, "above maximum")):
        with pytest.raises(InvalidFilter, match=message):
            MoleculeFilter(bad)
    with pytest.raises(InvalidFilter, match=r"invalid SMARTS 'c1ccc\('"):
        MoleculeFilter(smarts="c1ccc(")


def test_smarts_filter_equals_brute_force_substructure_match(small_root):
    smiles = [line.split("\t")[1] for line in (small_root / "validation.txt").read_text().splitlines()[1:]]
    for smarts in ("c1ccccc1", "C(=O)[OX2H1,OX1-]", "[#7]", "[OX2H][CX4]"):
        pattern = Chem.MolFromSmarts(smarts)
        expected = [s for s in smiles if Chem.MolFromSmiles(s) is not None and Chem.MolFromSmiles(s).HasSubstructMatch(pattern)]
        assert [s for s in smiles if MoleculeFilter(smarts=smarts).accepts(s)] == expected
        assert 0 < len(expected) < len(smiles)


def test_depiction_highlights_the_shared_substructure():
    plain, highlighted = depict_svg(IBUPROFEN), depict_svg(IBUPROFEN, "c1ccccc1C(C)C(=O)O")
    assert plain.startswith("<?xml") and "<svg" in plain and "<path" in plain
    assert highlighted != plain and "#FF7F7F" in highlighted.upper() and "#FF7F7F" not in plain.upper()
    assert tanimoto(IBUPROFEN, IBUPROFEN) == 1.0 and 0 <= tanimoto(ASPIRIN, IBUPROFEN) < 0.5
    with pytest.raises(ValueError, match="C1CC"):
        depict_svg("C1CC")


def test_exports_and_molfile_upload():
    results = [{"rank": 1, "score": 0.9, "id": "2244", "name": "aspirin", "smiles": ASPIRIN, "inchikey": "x",
                "properties": properties(ASPIRIN)}]
    rows = results_csv(results).splitlines()
    assert rows[0].startswith("rank,score,id,name,smiles,inchikey,mw,clogp") and rows[1].startswith("1,0.9,2244,aspirin,")
    supplier = Chem.SDMolSupplier()
    supplier.SetData(results_sdf(results))
    records = [m for m in supplier]
    assert len(records) == 1 and Chem.MolToSmiles(records[0]) == Chem.CanonSmiles(ASPIRIN)
    assert records[0].GetProp("_Name") == "2244" and float(records[0].GetProp("mw")) == pytest.approx(180.159, abs=0.01)
    molblock = Chem.MolToMolBlock(Chem.MolFromSmiles(IBUPROFEN))
    assert molfile_to_smiles(molblock + "$$$$\n" + molblock) == Chem.CanonSmiles(IBUPROFEN)
    with pytest.raises(ValueError, match="cannot read"):
        molfile_to_smiles("not a molfile")


def test_requests_are_capped_at_the_stated_limits_and_the_limit_itself_is_accepted():
    from tmr.chem import MAX_ATOMS, MAX_SMARTS_ATOMS, InvalidFilter, MoleculeFilter, TooLarge, depict_svg

    assert "<svg" in depict_svg("C" * MAX_ATOMS)  # at the cap: drawn
    with pytest.raises(TooLarge, match=f"{MAX_ATOMS + 1} heavy atoms; at most {MAX_ATOMS}"):
        depict_svg("C" * (MAX_ATOMS + 1))
    with pytest.raises(TooLarge, match="query has"):
        depict_svg("CCO", "C" * (MAX_ATOMS + 1))
    MoleculeFilter(smarts="C" * MAX_SMARTS_ATOMS)
    for smarts, limit in (("C" * (MAX_SMARTS_ATOMS + 1), f"at most {MAX_SMARTS_ATOMS}"),
                          ("[$(CO)][$(CN)][$(CS)]", "at most 2"), ("C" * 201, "at most 200")):
        with pytest.raises(InvalidFilter, match=limit):
            MoleculeFilter(smarts=smarts)
