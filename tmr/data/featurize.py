"""Molecule featurisation: SMILES -> PyG graph, with both node vocabularies tmr's encoders use.

* `x` / `edge_attr`: PyG's own OGB-style categorical atom and bond features (`from_rdmol`), for
  the default GINE encoder.
* `morgan`: each atom's Morgan identifier of radius 1 (radius 0 where RDKit dropped the radius-1
  environment as redundant), the vocabulary of Mol2vec / Text2Mol's table, for the paper's GCN.
  Identifiers stay raw here; the encoder maps them onto its table, so graphs do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import rdFingerprintGenerator
from torch_geometric.data import Data
from torch_geometric.utils import from_rdmol

RDLogger.DisableLog("rdApp.*")  # unparsable input is reported by tmr, with its id, not on stderr
_MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=1)


class InvalidMolecule(ValueError):
    """The SMILES cannot be turned into a graph; the message says why."""


@dataclass
class ParsedMolecule:
    mol: Chem.Mol
    canonical_smiles: str


def parse_smiles(smiles: str) -> ParsedMolecule:
    if not isinstance(smiles, str) or not smiles.strip():
        raise InvalidMolecule("empty SMILES")
    mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None:
        raise InvalidMolecule(f"RDKit cannot parse SMILES {smiles!r}")
    if mol.GetNumAtoms() == 0:
        raise InvalidMolecule(f"SMILES {smiles!r} has no atoms")
    return ParsedMolecule(mol, Chem.MolToSmiles(mol))


def morgan_identifiers(mol: Chem.Mol) -> torch.Tensor:
    """One Morgan identifier per atom (radius 1, else radius 0), as int64."""
    output = rdFingerprintGenerator.AdditionalOutput()
    output.AllocateBitInfoMap()
    _MORGAN.GetSparseCountFingerprint(mol, additionalOutput=output)
    by_radius: dict[int, list[int]] = {0: [-1] * mol.GetNumAtoms(), 1: [-1] * mol.GetNumAtoms()}
    for identifier, environments in output.GetBitInfoMap().items():
        for atom, radius in environments:
            by_radius[radius][atom] = identifier
    ids = [r1 if r1 >= 0 else r0 for r0, r1 in zip(by_radius[0], by_radius[1])]
    return torch.tensor(ids, dtype=torch.long)


def featurize(smiles: str) -> Data:
    """SMILES -> graph with `x`, `edge_index`, `edge_attr`, `morgan`; raises InvalidMolecule."""
    return featurize_parsed(parse_smiles(smiles), smiles)


def featurize_parsed(parsed: ParsedMolecule, smiles: str) -> Data:
    """The graph of an already parsed molecule (for callers that need the RDKit molecule too)."""
    try:
        graph = from_rdmol(parsed.mol)
    except ValueError as error:  # a feature value outside PyG's vocabulary (e.g. degree 11)
        raise InvalidMolecule(f"unsupported atom or bond in {smiles!r}: {error}") from error
    graph.morgan = morgan_identifiers(parsed.mol)
    graph.smiles = parsed.canonical_smiles
    return graph
