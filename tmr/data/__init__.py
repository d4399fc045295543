"""ChEBI-20 and users' own (id, SMILES, text) files: sources, featurisation, datasets, splits."""

from tmr.data.dataset import MoleculeTextDataset, PairCollator, Splits, load_splits
from tmr.data.featurize import InvalidMolecule, featurize, parse_smiles
from tmr.data.sources import available_splits, read_pairs, resolve_data_root

__all__ = ["InvalidMolecule", "MoleculeTextDataset", "PairCollator", "Splits", "available_splits", "featurize",
           "load_splits", "parse_smiles", "read_pairs", "resolve_data_root"]
