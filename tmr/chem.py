"""Chemistry for the people who read the results: the properties chemists screen by, filters on
them and on a SMARTS substructure, 2D depictions (RDKit SVG, the substructure shared with a query
highlighted) and the CSV / SDF a shortlist is exported as.

Everything is keyed by canonical SMILES and cached: a result page asks for the same molecules
again and again (paging, filters, the depictions of the cards).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from functools import lru_cache

from rdkit import Chem, DataStructs
from rdkit.Chem import Descriptors, rdDepictor, rdFMCS, rdFingerprintGenerator
from rdkit.Chem.Draw import rdMolDraw2D

# key -> (label, RDKit descriptor); the keys are the API's filter names
PROPERTIES = {
    "mw": ("MW", Descriptors.MolWt),
    "clogp": ("cLogP", Descriptors.MolLogP),
    "hbd": ("HBD", Descriptors.NumHDonors),
    "hba": ("HBA", Descriptors.NumHAcceptors),
    "tpsa": ("TPSA", Descriptors.TPSA),
    "rotatable_bonds": ("RotB", Descriptors.NumRotatableBonds),
}
# Lipinski's rule of five; a molecule passes with at most one violation, as Lipinski (1997) states it
LIPINSKI_LIMITS = {"mw": 500.0, "clogp": 5.0, "hbd": 5, "hba": 10}

_MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)

# What a request may ask RDKit to do, so that a cheap request cannot become an expensive one. Drawing
# grows faster than linearly with size (a 420-atom ring chain: 0.75 s; ChEBI-20's largest, 574
# atoms: 2.2 s); 99.7% of ChEBI-20's molecules and every MOSES one have at most 300 heavy atoms.
MAX_ATOMS = 300  # heavy atoms of a depicted molecule or a structure query
MAX_SMARTS_CHARS = 200
MAX_SMARTS_ATOMS = 30  # a substructure filter is matched against up to 20,000 candidates
MAX_SMARTS_RECURSIONS = 2  # $(...) environments, each a nested match per atom


class InvalidFilter(ValueError):
    """A filter that cannot be applied (unknown property, bad range, unparsable or too complex SMARTS)."""


class TooLarge(ValueError):
    """A molecule over MAX_ATOMS heavy atoms."""


def check_size(mol: Chem.Mol, what: str = "molecule") -> None:
    atoms = mol.GetNumHeavyAtoms()
    if atoms > MAX_ATOMS:
        raise TooLarge(f"{what} has {atoms} heavy atoms; at most {MAX_ATOMS} are accepted")


@lru_cache(maxsize=4096)
def molecule(smiles: str) -> Chem.Mol | None:
    return Chem.MolFromSmiles(smiles)


def properties_of(mol: Chem.Mol) -> dict:
    """MW, cLogP, HBD, HBA, TPSA, rotatable bonds, Lipinski violations and pass/fail of a parsed molecule."""
    values = {key: round(float(function(mol)), 3) if key in ("mw", "clogp", "tpsa") else int(function(mol))
              for key, (_, function) in PROPERTIES.items()}
    violations = sum(values[key] > limit for key, limit in LIPINSKI_LIMITS.items())
    return {**values, "lipinski_violations": violations, "lipinski": violations <= 1}


def inchikey_of(mol: Chem.Mol) -> str:
    return Chem.MolToInchiKey(mol) or ""


# An index built by tmr.library stores both for each of its molecules (computed once, at build);
# these cached forms serve indexes built without them and molecules that are not in an index.
@lru_cache(maxsize=200_000)
def properties(smiles: str) -> dict:
    """`properties_of` by SMILES; {} if unparsable."""
    mol = molecule(smiles)
    return properties_of(mol) if mol is not None else {}


@lru_cache(maxsize=200_000)
def inchikey(smiles: str) -> str:
    """The InChIKey of a SMILES ("" if RDKit cannot make one)."""
    mol = molecule(smiles)
    return inchikey_of(mol) if mol is not None else ""


def tanimoto(query_smiles: str, smiles: str) -> float | None:
    a, b = molecule(query_smiles), molecule(smiles)
    if a is None or b is None:
        return None
    return float(DataStructs.TanimotoSimilarity(_MORGAN.GetFingerprint(a), _MORGAN.GetFingerprint(b)))


@dataclass
class MoleculeFilter:
    """Property ranges (inclusive; None = open), Lipinski pass, and a SMARTS substructure."""

    ranges: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    smarts: str | None = None
    lipinski: bool | None = None

    def __post_init__(self) -> None:
        for key, (low, high) in self.ranges.items():
            if key not in PROPERTIES:
                raise InvalidFilter(f"unknown property {key!r}; filter on {sorted(PROPERTIES)}")
            if low is not None and high is not None and low > high:
                raise InvalidFilter(f"{key}: minimum {low} is above maximum {high}")
        self.pattern = None
        if self.smarts:
            if len(self.smarts) > MAX_SMARTS_CHARS:
                raise InvalidFilter(f"SMARTS of {len(self.smarts)} characters; at most {MAX_SMARTS_CHARS}")
            self.pattern = Chem.MolFromSmarts(self.smarts)
            if self.pattern is None:
                raise InvalidFilter(f"invalid SMARTS {self.smarts!r}: RDKit cannot parse it")
            if self.pattern.GetNumAtoms() > MAX_SMARTS_ATOMS:
                raise InvalidFilter(f"SMARTS with {self.pattern.GetNumAtoms()} atoms; at most {MAX_SMARTS_ATOMS}")
            if self.smarts.count("$(") > MAX_SMARTS_RECURSIONS:
                raise InvalidFilter(f"SMARTS with {self.smarts.count('$(')} recursive $(...) environments; "
                                    f"at most {MAX_SMARTS_RECURSIONS}")

    @property
    def active(self) -> bool:
        return bool(self.pattern is not None or self.lipinski is not None
                    or any(low is not None or high is not None for low, high in self.ranges.values()))

    def accepts(self, smiles: str, values: dict | None = None) -> bool:
        """Whether a molecule passes; `values`: its properties when already known (an index stores them)."""
        values = values or properties(smiles)
        if not values:
            return False
        for key, (low, high) in self.ranges.items():
            if (low is not None and values[key] < low) or (high is not None and values[key] > high):
                return False
        if self.lipinski is not None and values["lipinski"] != self.lipinski:
            return False
        return self.pattern is None or molecule(smiles).HasSubstructMatch(self.pattern)


@lru_cache(maxsize=1024)
def shared_substructure(query_smiles: str, smiles: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Atoms and bonds of `smiles` in its maximum common substructure with the query (1 s budget)."""
    query, mol = molecule(query_smiles), molecule(smiles)
    if query is None or mol is None:
        return (), ()
    mcs = rdFMCS.FindMCS([query, mol], timeout=1, ringMatchesRingOnly=True, completeRingsOnly=True)
    if not mcs.smartsString or mcs.numAtoms < 2:
        return (), ()
    atoms = mol.GetSubstructMatch(Chem.MolFromSmarts(mcs.smartsString))
    bonds = tuple(bond.GetIdx() for bond in mol.GetBonds()
                  if bond.GetBeginAtomIdx() in atoms and bond.GetEndAtomIdx() in atoms)
    return tuple(atoms), bonds


@lru_cache(maxsize=8192)
def depict_svg(smiles: str, query_smiles: str | None = None, width: int = 260, height: int = 200) -> str:
    """An SVG of the molecule; with a query, the substructure they share highlighted. Raises
    ValueError for an unparsable SMILES and TooLarge (a ValueError) past MAX_ATOMS."""
    mol = molecule(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    check_size(mol)
    if query_smiles and molecule(query_smiles) is not None:
        check_size(molecule(query_smiles), "query")
    atoms, bonds = shared_substructure(query_smiles, smiles) if query_smiles else ((), ())
    drawer = rdMolDraw2D.MolDraw2DSVG(width, height)
    drawer.drawOptions().clearBackground = False
    rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol, highlightAtoms=list(atoms), highlightBonds=list(bonds))
    drawer.FinishDrawing()
    return drawer.GetDrawingText()


EXPORT_COLUMNS = ["rank", "score", "id", "name", "smiles", "inchikey", *PROPERTIES, "lipinski", "tanimoto", "url", "text"]


def results_csv(results: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, EXPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in results:
        writer.writerow({**result, **result.get("properties", {})})
    return buffer.getvalue()


def results_sdf(results: list[dict]) -> str:
    """An SD file with a 2D layout and every exported column as a data field."""
    buffer = io.StringIO()
    writer = Chem.SDWriter(buffer)
    for result in results:
        mol = Chem.Mol(molecule(result["smiles"]))
        rdDepictor.Compute2DCoords(mol)
        mol.SetProp("_Name", str(result.get("id", "")))
        for key, value in {**result, **result.get("properties", {})}.items():
            if key in EXPORT_COLUMNS and value not in (None, ""):
                mol.SetProp(key, str(value))
        writer.write(mol)
    writer.close()
    return buffer.getvalue()


def molfile_to_smiles(text: str) -> str:
    """The first record of a .mol / .sdf text as SMILES; ValueError when RDKit cannot read it."""
    block = text.split("$$$$")[0]
    mol = Chem.MolFromMolBlock(block) if block.strip() else None
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError("RDKit cannot read the uploaded .mol/.sdf (first record)")
    return Chem.MolToSmiles(mol)
