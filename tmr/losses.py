"""Losses of method.md, over the global batch: first order (batch-hard triplet or InfoNCE),
adversarial alignment (WGAN-GP), and the four second-order KL terms.

As in open_clip's `--local-loss --gather-with-grad`: each worker computes the loss of its own rows
against features all-gathered from every worker, with autograd through the gather. Each term is a
mean over local rows, so the data-parallel average of worker gradients equals the gradient of the
single-process loss on the whole global batch. With no process group everything is local.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tmr.config import LossConfig


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate every worker's rows; the local slice keeps its gradient, others send theirs back."""
    _, size = world()
    if size == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; the public one still works
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(features.contiguous()), dim=0)


def local_rows(local_size: int) -> torch.Tensor:
    """Positions of this worker's rows in the gathered batch (equal shards)."""
    rank, _ = world()
    return torch.arange(local_size) + rank * local_size


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances; clamped under the root so d(x, x) = 0 has a finite gradient."""
    squared = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(0) - 2 * a @ b.T
    return squared.clamp_min(1e-12).sqrt()


def batch_hard_triplet(text: torch.Tensor, molecule: torch.Tensor, all_text: torch.Tensor, all_molecule: torch.Tensor,
                       rows: torch.Tensor, margin: float) -> torch.Tensor:
    """Anchors: the local texts and molecules. Positive: the anchor's own pair in the other modality.
    Negative: the closest item, in either modality, of any other pair of the global batch."""
    everything = torch.cat([all_text, all_molecule])
    n = all_text.shape[0]
    pair_of = torch.arange(n, device=text.device).repeat(2)
    losses = []
    for anchors, positives in ((text, all_molecule), (molecule, all_text)):
        distances = pairwise_distance(anchors, everything)
        same_pair = pair_of.unsqueeze(0) == rows.to(text.device).unsqueeze(1)
        d_neg = distances.masked_fill(same_pair, float("inf")).min(dim=1).values
        d_pos = (anchors - positives[rows]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
        losses.append(F.relu(d_pos - d_neg + margin))
    return torch.cat(losses).mean()


def info_nce(text: torch.Tensor, molecule: torch.Tensor, all_text: torch.Tensor, all_molecule: torch.Tensor,
             rows: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: local texts against all molecules and local molecules against all texts."""
    scale = logit_scale.exp()
    labels = rows.to(text.device)
    return (F.cross_entropy(scale * text @ all_molecule.T, labels)
            + F.cross_entropy(scale * molecule @ all_text.T, labels)) / 2


def similarity_log_distribution(a: torch.Tensor, b: torch.Tensor, kind: str, tau2: float) -> torch.Tensor:
    """log softmax over j of sim(a_i, b_j) / tau2, for the second-order terms."""
    if kind == "distance":  # the released run: far items weigh more
        logits = pairwise_distance(a, b)
    elif kind == "neg_distance":
        logits = -pairwise_distance(a, b)
    elif kind == "cosine":
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    else:
        raise ValueError(f"unknown second-order similarity {kind!r}")
    return F.log_softmax(logits / tau2, dim=-1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """mean_i KL(P_i || Q_i) = mean_i sum_j P_ij (log P_ij - log Q_ij)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def second_order(text: torch.Tensor, molecule: torch.Tensor, all_text: torch.Tensor, all_molecule: torch.Tensor,
                 kind: str, tau2: float) -> dict[str, torch.Tensor]:
    log_tt = similarity_log_distribution(text, all_text, kind, tau2)
    log_mm = similarity_log_distribution(molecule, all_molecule, kind, tau2)
    log_tm = similarity_log_distribution(text, all_molecule, kind, tau2)
    log_mt = similarity_log_distribution(molecule, all_text, kind, tau2)
    return {
        "kl_t2m": kl_rows(log_mm, log_tt),  # intra-modal structures matched, gradients both ways
        "kl_m2t": kl_rows(log_tt, log_mm),
        "kl_2m": kl_rows(log_mm.detach(), log_tm),  # cross-modal pulled to a fixed intra-modal target
        "kl_2t": kl_rows(log_tt.detach(), log_mt),
    }


class Discriminator(nn.Module):
    """WGAN critic on mean-pooled features before the memory bank: texts real, molecules fake."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2),
                                 nn.Linear(256, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def critic_loss(discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor, penalty_weight: float
                ) -> dict[str, torch.Tensor]:
    """WGAN-GP critic loss on detached features: D(fake) - D(real) + w * (|grad D(interp)| - 1)^2."""
    real, fake = real.detach(), fake.detach()
    alpha = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    interpolates = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (gradients,) = torch.autograd.grad(discriminator(interpolates).sum(), interpolates, create_graph=True)
    penalty = (gradients.norm(2, dim=-1) - 1).pow(2).mean()
    wasserstein = discriminator(fake).mean() - discriminator(real).mean()
    return {"critic": wasserstein + penalty_weight * penalty, "wasserstein": wasserstein.detach(),
            "gradient_penalty": penalty.detach()}


class AlignmentLoss(nn.Module):
    """Model loss of method.md over the global batch; returns every term and the weighted total."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config

    def forward(self, outputs: dict[str, torch.Tensor], discriminator: Discriminator | None = None,
                logit_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        c = self.config
        text, molecule = outputs["text"], outputs["molecule"]
        all_text, all_molecule = gather_features(text), gather_features(molecule)
        rows = local_rows(text.shape[0])
        terms: dict[str, torch.Tensor] = {}
        if c.first_order not in ("triplet", "infonce", "both"):
            raise ValueError(f"unknown first-order loss {c.first_order!r}; use 'triplet', 'infonce' or 'both'")
        total = torch.zeros((), device=text.device, dtype=text.dtype)
        if c.first_order in ("triplet", "both"):
            terms["triplet"] = batch_hard_triplet(text, molecule, all_text, all_molecule, rows, c.margin)
            total = total + terms["triplet"]
        if c.first_order in ("infonce", "both"):
            terms["infonce"] = info_nce(text, molecule, all_text, all_molecule, rows, logit_scale)
            total = total + terms["infonce"]
        if c.adversarial_weight > 0 and discriminator is not None:
            # Only the molecule side is pushed toward texts; the critic's own weights are not updated here.
            discriminator.requires_grad_(False)
            terms["adversarial"] = -discriminator(outputs["molecule_pooled"]).mean()
            discriminator.requires_grad_(True)
            total = total + c.adversarial_weight * terms["adversarial"]
        if c.intra_weight > 0 or c.cross_weight > 0:
            terms.update(second_order(text, molecule, all_text, all_molecule, c.second_order_similarity, c.tau2))
            total = total + c.intra_weight * (terms["kl_t2m"] + terms["kl_m2t"])
            total = total + c.cross_weight * (terms["kl_2m"] + terms["kl_2t"])
        terms["loss"] = total
        return terms
