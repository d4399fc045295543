"""tmr: cross-modal text-molecule retrieval (Song et al. 2024), trained and served on Ray."""

__version__ = "0.1.0"
