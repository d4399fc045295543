"""Each loss term against a hand computation on a tiny batch, and where its gradient flows."""

import math

import torch
import torch.nn.functional as F

from tmr.config import LossConfig
from tmr.losses import AlignmentLoss, Discriminator, critic_loss, second_order

torch.manual_seed(0)
B, D = 5, 7


def unit(n=B):
    return F.normalize(torch.randn(n, D, dtype=torch.float64), dim=-1)


def dist(a, b):
    # tmr clamps squared distances at 1e-12 so that d(x, x) has a finite gradient
    return math.sqrt(max(1e-12, sum((x - y) ** 2 for x, y in zip(a.tolist(), b.tolist()))))


def hand_triplet(t, m, margin):
    items = [(t[i], i) for i in range(B)] + [(m[i], i) for i in range(B)]
    total = 0.0
    for anchors, partners in ((t, m), (m, t)):
        for i in range(B):
            d_pos = dist(anchors[i], partners[i])
            d_neg = min(dist(anchors[i], x) for x, j in items if j != i)
            total += max(0.0, d_pos - d_neg + margin)
    return total / (2 * B)


def test_triplet_matches_hand_computation():
    t, m = unit(), unit()
    loss = AlignmentLoss(LossConfig(intra_weight=0, cross_weight=0, adversarial_weight=0, margin=0.3))
    out = loss({"text": t, "molecule": m})
    assert math.isclose(out["triplet"].item(), hand_triplet(t, m, 0.3), rel_tol=1e-9)
    assert out["loss"].item() == out["triplet"].item()
    # a margin large enough makes every anchor active, so the loss is strictly positive
    assert AlignmentLoss(LossConfig(intra_weight=0, cross_weight=0, margin=5.0))({"text": t, "molecule": m})["triplet"] > 4


def test_triplet_is_zero_for_perfectly_separated_pairs():
    base = torch.eye(B, D, dtype=torch.float64)
    out = AlignmentLoss(LossConfig(intra_weight=0, cross_weight=0))({"text": base, "molecule": base.clone()})
    assert out["triplet"].item() == 0.0


def test_infonce_matches_hand_computation():
    t, m = unit(), unit()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    out = AlignmentLoss(LossConfig(first_order="infonce", intra_weight=0, cross_weight=0))(
        {"text": t, "molecule": m}, logit_scale=scale)
    total = 0.0
    for q, c in ((t, m), (m, t)):
        for i in range(B):
            logits = [10.0 * float(q[i] @ c[j]) for j in range(B)]
            total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    assert math.isclose(out["infonce"].item(), total / (2 * B), rel_tol=1e-9)


def hand_distribution(a, b, kind, tau2):
    rows = []
    for i in range(len(a)):
        if kind == "distance":
            s = [dist(a[i], b[j]) for j in range(len(b))]
        elif kind == "neg_distance":
            s = [-dist(a[i], b[j]) for j in range(len(b))]
        else:
            s = [float(a[i] @ b[j]) for j in range(len(b))]
        e = [math.exp(x / tau2) for x in s]
        rows.append([x / sum(e) for x in e])
    return rows


def hand_kl(p, q):
    return sum(sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)) / len(p)


def test_second_order_terms_match_hand_computation():
    t, m = unit(), unit()
    for kind in ("distance", "neg_distance", "cosine"):
        terms = second_order(t, m, t, m, kind, 0.5)
        tt, mm = hand_distribution(t, t, kind, 0.5), hand_distribution(m, m, kind, 0.5)
        tm, mt = hand_distribution(t, m, kind, 0.5), hand_distribution(m, t, kind, 0.5)
        assert math.isclose(terms["kl_t2m"].item(), hand_kl(mm, tt), rel_tol=1e-7)
        assert math.isclose(terms["kl_m2t"].item(), hand_kl(tt, mm), rel_tol=1e-7)
        assert math.isclose(terms["kl_2m"].item(), hand_kl(mm, tm), rel_tol=1e-7)
        assert math.isclose(terms["kl_2t"].item(), hand_kl(tt, mt), rel_tol=1e-7)


def test_second_order_stop_gradients():
    t0, m0 = unit(), unit()
    # L_2m = KL(sg(P_mm) || P_tm): the gradient reaches molecules only through P_tm, i.e. it is the
    # gradient of the cross-entropy -sum sg(P_mm) log P_tm.
    t, m = t0.clone().requires_grad_(), m0.clone().requires_grad_()
    second_order(t, m, t, m, "cosine", 1.0)["kl_2m"].backward()
    t2, m2 = t0.clone().requires_grad_(), m0.clone().requires_grad_()
    target = F.softmax(m0 @ m0.T, dim=-1)
    (-(target * F.log_softmax(F.normalize(t2, dim=-1) @ F.normalize(m2, dim=-1).T, dim=-1)).sum(-1).mean()).backward()
    assert torch.allclose(m.grad, m2.grad) and torch.allclose(t.grad, t2.grad)
    # L_t2m = KL(P_mm || P_tt) has no stop-gradient: both modalities receive gradient
    t, m = t0.clone().requires_grad_(), m0.clone().requires_grad_()
    second_order(t, m, t, m, "cosine", 1.0)["kl_t2m"].backward()
    assert t.grad.abs().sum() > 0 and m.grad.abs().sum() > 0
    # L_2t = KL(sg(P_tt) || P_mt): texts receive gradient only as candidates of P_mt
    t, m = t0.clone().requires_grad_(), m0.clone().requires_grad_()
    second_order(t, m, t, m, "cosine", 1.0)["kl_2t"].backward()
    t3, m3 = t0.clone().requires_grad_(), m0.clone().requires_grad_()
    target = F.softmax(t0 @ t0.T, dim=-1)
    (-(target * F.log_softmax(F.normalize(m3, dim=-1) @ F.normalize(t3, dim=-1).T, dim=-1)).sum(-1).mean()).backward()
    assert torch.allclose(t.grad, t3.grad) and torch.allclose(m.grad, m3.grad)


def test_weighted_total_and_adversarial_term():
    t, m = unit().float(), unit().float()
    tp, mp = torch.randn(B, D), torch.randn(B, D, requires_grad=True)
    critic = Discriminator(D)
    cfg = LossConfig(adversarial_weight=0.5, intra_weight=2.0, cross_weight=3.0)
    out = AlignmentLoss(cfg)({"text": t, "molecule": m, "text_pooled": tp, "molecule_pooled": mp}, critic)
    assert torch.isclose(out["adversarial"], -critic(mp).mean())
    expected = (out["triplet"] + 0.5 * out["adversarial"] + 2.0 * (out["kl_t2m"] + out["kl_m2t"])
                + 3.0 * (out["kl_2m"] + out["kl_2t"]))
    assert torch.isclose(out["loss"], expected)
    out["adversarial"].backward()
    assert mp.grad is not None and all(p.grad is None for p in critic.parameters())  # critic not trained by the model loss


def test_critic_loss_gradient_penalty():
    # A linear critic D(x) = w.x has |grad| = |w| everywhere: the penalty is (|w| - 1)^2 exactly.
    critic = Discriminator(D)
    real, fake = torch.randn(B, D), torch.randn(B, D)
    linear = torch.nn.Linear(D, 1)
    critic.net = linear
    out = critic_loss(critic, real, fake, 10.0)
    w = linear.weight.detach().squeeze(0)
    expected_wasserstein = (linear(fake).mean() - linear(real).mean()).item()
    assert math.isclose(out["wasserstein"].item(), expected_wasserstein, rel_tol=1e-5)
    assert math.isclose(out["gradient_penalty"].item(), (w.norm().item() - 1) ** 2, rel_tol=1e-5)
