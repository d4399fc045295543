"""Chunked retrieval metrics against a brute-force reference."""

import math

import torch
import torch.nn.functional as F

from tmr.metrics import ranks_of_gold, retrieval_metrics


def brute_ranks(queries, candidates, gold):
    out = []
    for i, q in enumerate(queries.tolist()):
        scores = [sum(a * b for a, b in zip(q, c)) for c in candidates.tolist()]
        out.append(1 + sum(s > scores[gold[i]] for s in scores))
    return out


def test_ranks_match_brute_force_across_chunks():
    torch.manual_seed(1)
    q, c = F.normalize(torch.randn(37, 8, dtype=torch.float64), dim=-1), F.normalize(torch.randn(53, 8, dtype=torch.float64), dim=-1)
    gold = torch.randint(0, 53, (37,))
    expected = brute_ranks(q, c, gold.tolist())
    assert ranks_of_gold(q, c, gold, query_chunk=5, candidate_chunk=7).tolist() == expected
    assert ranks_of_gold(q, c, gold).tolist() == expected


def test_metrics_both_pools_and_directions():
    torch.manual_seed(2)
    text, molecule = F.normalize(torch.randn(40, 6, dtype=torch.float64), dim=-1), F.normalize(torch.randn(40, 6, dtype=torch.float64), dim=-1)
    positions = torch.arange(10, 25)
    for pool in ("all", "split"):
        out = retrieval_metrics(text, molecule, positions, pool)
        cand_t, cand_m = (text, molecule) if pool == "all" else (text[positions], molecule[positions])
        gold = positions.tolist() if pool == "all" else list(range(15))
        assert out["text_to_molecule"]["pool"] == out["molecule_to_text"]["pool"] == (40 if pool == "all" else 15)
        assert out["queries"] == 15
        for key, q, c in (("text_to_molecule", text[positions], cand_m), ("molecule_to_text", molecule[positions], cand_t)):
            ranks = brute_ranks(q, c, gold)
            got = out[key]
            assert math.isclose(got["mean_rank"], sum(ranks) / 15)
            assert math.isclose(got["mrr"], 100 * sum(1 / r for r in ranks) / 15)
            assert math.isclose(got["hits@1"], 100 * sum(r == 1 for r in ranks) / 15)
            assert math.isclose(got["hits@10"], 100 * sum(r <= 10 for r in ranks) / 15)


def test_gold_never_outranks_itself_under_rounding():
    torch.manual_seed(3)
    q = F.normalize(torch.randn(300, 300), dim=-1)
    ranks = ranks_of_gold(q, q.clone(), torch.arange(300), query_chunk=64, candidate_chunk=100)
    assert (ranks == 1).all()


def test_perfect_embeddings_rank_first():
    x = torch.eye(12)
    out = retrieval_metrics(x, x.clone())
    assert out["text_to_molecule"] == {"pool": 12, "hits@1": 100.0, "hits@10": 100.0, "mrr": 100.0, "mean_rank": 1.0}


def test_pool_metrics_rank_each_direction_against_its_own_pool():
    """Text2Mol's protocol: texts against a bigger molecule pool (gold by position there), molecules
    against the texts; each direction names its pool size."""
    from tmr.metrics import pool_metrics

    torch.manual_seed(3)
    unit = lambda n: F.normalize(torch.randn(n, 6, dtype=torch.float64), dim=-1)  # noqa: E731
    all_text, all_molecules = unit(30), unit(70)
    text_gold, molecule_gold = torch.arange(5, 17), torch.randperm(70)[:12]
    text, molecule = all_text[text_gold], all_molecules[molecule_gold]
    out = pool_metrics(text, molecule, all_text, text_gold, all_molecules, molecule_gold)
    assert out["text_to_molecule"]["pool"] == 70 and out["molecule_to_text"]["pool"] == 30 and out["queries"] == 12
    t2m = brute_ranks(text, all_molecules, molecule_gold.tolist())
    m2t = brute_ranks(molecule, all_text, text_gold.tolist())
    assert math.isclose(out["text_to_molecule"]["mean_rank"], sum(t2m) / 12)
    assert math.isclose(out["molecule_to_text"]["mrr"], 100 * sum(1 / r for r in m2t) / 12)
