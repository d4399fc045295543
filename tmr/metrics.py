"""Retrieval metrics of Text2Mol's protocol: Hits@1, Hits@10, MRR, mean rank, both directions.

A query's rank is 1 + the number of candidates scored strictly higher (cosine) than its own pair.
Two candidate pools: "all" (Text2Mol's: every molecule of ChEBI-20, 33,010, for text -> molecule,
and every text present for molecule -> text) and "split" (the evaluated split alone). Each
direction names its own pool size. Scores are computed in chunks, so 100k x 100k pools fit in memory.
Hits and MRR are reported in percent, as the literature's tables are.
"""

from __future__ import annotations

import torch


def ranks_of_gold(queries: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor, query_chunk: int = 1024,
                  candidate_chunk: int = 65536) -> torch.Tensor:
    """rank[i] = 1 + #{j : <q_i, c_j> > <q_i, c_gold[i]>}."""
    ranks = torch.empty(len(queries), dtype=torch.long)
    for start in range(0, len(queries), query_chunk):
        q, g = queries[start:start + query_chunk], gold[start:start + query_chunk]
        gold_scores = (q * candidates[g]).sum(-1, keepdim=True)
        higher = torch.zeros(len(q), dtype=torch.long)
        for c_start in range(0, len(candidates), candidate_chunk):
            above = q @ candidates[c_start:c_start + candidate_chunk].T > gold_scores
            # the gold itself never counts, whatever rounding the matmul kernel does
            inside = (g >= c_start) & (g < c_start + above.shape[1])
            above[inside.nonzero().squeeze(1), (g[inside] - c_start)] = False
            higher += above.sum(-1)
        ranks[start:start + query_chunk] = higher + 1
    return ranks


def summarize(ranks: torch.Tensor) -> dict[str, float]:
    ranks = ranks.double()
    return {"hits@1": 100 * (ranks <= 1).double().mean().item(), "hits@10": 100 * (ranks <= 10).double().mean().item(),
            "mrr": 100 * (1 / ranks).mean().item(), "mean_rank": ranks.mean().item()}


def direction_metrics(queries: torch.Tensor, candidates: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    """One direction: each query against every candidate; gold[i] is query i's own candidate."""
    return {"pool": len(candidates), **summarize(ranks_of_gold(queries.float(), candidates.float(), torch.as_tensor(gold)))}


def pool_metrics(text: torch.Tensor, molecule: torch.Tensor, all_text: torch.Tensor, text_gold: torch.Tensor,
                 all_molecules: torch.Tensor, molecule_gold: torch.Tensor) -> dict:
    """Queries (text[i], molecule[i]) are pairs; each ranked against its own pool (Text2Mol's protocol):
    text[i] against all_molecules (gold molecule_gold[i]), molecule[i] against all_text (gold text_gold[i])."""
    return {"queries": len(text), "text_to_molecule": direction_metrics(text, all_molecules, molecule_gold),
            "molecule_to_text": direction_metrics(molecule, all_text, text_gold)}


def retrieval_metrics(text: torch.Tensor, molecule: torch.Tensor, positions: torch.Tensor | None = None,
                      pool: str = "all") -> dict:
    """text[i] and molecule[i] are a pair; queries are the pairs at `positions` (default: all).

    pool="all": each query ranked against every molecule (text) given; pool="split": only against
    the queries' own pairs.
    """
    text, molecule = text.float(), molecule.float()
    positions = torch.arange(len(text)) if positions is None else torch.as_tensor(positions)
    if pool == "split":
        text, molecule, positions = text[positions], molecule[positions], torch.arange(len(positions))
    elif pool != "all":
        raise ValueError(f"pool must be 'all' or 'split', not {pool!r}")
    return pool_metrics(text[positions], molecule[positions], text, positions, molecule, positions)
