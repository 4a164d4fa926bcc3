"""The distillation losses: the student's logits against the teacher's targets (and hard labels).

``mse`` (the default, from the course this project grew from) compares probabilities;
``logit-mse`` regresses the student's centred logits on the teacher's centred log-probabilities
(Ba & Caruana 2014, "Do deep nets really need to be deep?"): the teacher's answers are
probabilities, and log p minus its mean over the classes is the logit vector they came from, up to
the constant a softmax ignores. ``kl`` is Hinton et al. (2015): KL(teacher_T || student_T) scaled by T^2 so its gradients keep the same
magnitude whatever the temperature. Teacher answers are stored as probabilities, not logits,
so the teacher is softened as ``p^(1/T)`` renormalised, which equals ``softmax(log(p) / T)``.

DisturbLabel (Xie et al. 2016) is a regulariser of the hard-label term only: the soft targets
are the teacher's answer and are never disturbed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("mse", "logit-mse", "kl")

# logit-mse: a class the teacher gave nothing (outside its top k, or no answer at all) is taken as
# this probability, so its log is finite (-6.9): "far below the answered classes", not -infinity.
LOGIT_FLOOR = 1e-3


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, C) probabilities raised to 1/T and renormalised: softmax(log p / T). T=1: unchanged."""
    if temperature == 1.0:
        return probs
    # In log space: p^(1/T) underflows for small p and large 1/T; zeros stay zeros.
    logp = torch.log(probs.clamp_min(0)) / temperature
    return torch.softmax(logp, dim=1)


def distill_loss(
    logits: torch.Tensor,
    soft_targets: torch.Tensor,
    hard_labels: torch.Tensor | None,
    kind: str = "mse",
    temperature: float = 1.0,
    hard_weight: float = 0.0,
) -> torch.Tensor:
    """Scalar loss for one batch.

    logits: (B, C) student outputs (any dtype; computed in float32); soft_targets: (B, C) rows
    summing to 1; hard_labels: (B,) int64 class indices, or (B, C) probabilities (mixup), used
    when hard_weight > 0.
    ``mse``: mean over batch and classes of (softmax(z/T) - target)^2, the target as stored.
    ``logit-mse``: mean of (z - mean(z) - (log t - mean(log t)))^2, t floored at LOGIT_FLOOR
    (no temperature: the logits are compared as they are).
    ``kl``: T^2 * KL(soften(target, T) || softmax(z/T)), averaged over the batch.
    Plus ``hard_weight`` * cross-entropy(z, hard_labels) at T=1.
    """
    z = logits.float()
    t = float(temperature)
    if kind == "mse":
        loss = F.mse_loss(torch.softmax(z / t, dim=1), soft_targets)
    elif kind == "logit-mse":
        logt = torch.log(soft_targets.float().clamp_min(LOGIT_FLOOR))
        loss = F.mse_loss(z - z.mean(dim=1, keepdim=True), logt - logt.mean(dim=1, keepdim=True))
    elif kind == "kl":
        target = soften(soft_targets, t)
        loss = t * t * F.kl_div(torch.log_softmax(z / t, dim=1), target, reduction="batchmean")
    else:
        raise ValueError(f"unknown loss {kind!r}; valid: {', '.join(LOSSES)}")
    if hard_weight:
        if hard_labels is None:
            raise ValueError("hard_weight > 0 needs hard_labels")
        loss = loss + hard_weight * F.cross_entropy(z, hard_labels)
    return loss


def mixup(x: torch.Tensor, soft: torch.Tensor, hard: torch.Tensor, lam: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) within a batch, image i with image B-1-i: the images, the soft
    targets and the one-hot hard labels all mixed with the same weights ``lam`` and ``1 - lam``.

    Hand-written: torchvision's v2.MixUp and timm's Mixup take integer labels and one-hot them,
    so they cannot mix the teacher's soft targets. Returns (x, soft, hard) with hard as (B, C)
    probabilities (cross-entropy takes those as they are).
    """
    hard = F.one_hot(hard, soft.shape[1]).to(soft.dtype) if hard.ndim == 1 else hard
    mix = lambda t: t.mul(lam).add_(t.flip(0), alpha=1.0 - lam)  # noqa: E731
    return mix(x), mix(soft), mix(hard)


def disturb_labels(labels: torch.Tensor, num_classes: int, rate: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """DisturbLabel: each label, with probability ``rate``, is replaced by a class drawn uniformly
    from all ``num_classes`` (itself included, as in the paper), so about rate * (C - 1) / C of
    the labels change. ``generator`` (CPU) makes the draw repeatable per batch."""
    if rate <= 0:
        return labels
    chosen = torch.rand(labels.shape, generator=generator) < rate
    drawn = torch.randint(num_classes, labels.shape, generator=generator)
    return torch.where(chosen.to(labels.device), drawn.to(labels.device, labels.dtype), labels)
