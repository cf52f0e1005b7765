"""The distillation terms beside KL distillation (`losses.kd_loss`) and the L2-normalised
feature maps (`losses.feature_loss`), which `losses.Objective` adds where the config asks:

- BNext's loss from a teacher and its assistants (`distill.assistants`, `distill.weighting`);
- Real-to-Binary Net's attention matching (`distill.feature_loss: attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import choose

WEIGHTINGS = ("cross_entropy", "equal")
"""`distill.weighting`: how each sample weights its teachers (`multi_teacher_loss`)."""
FEATURE_LOSSES = ("l2_normalized", "attention")
"""`distill.feature_loss`: `losses.feature_loss` or `attention_loss`."""


def multi_teacher_loss(student: Tensor, teachers: list[Tensor], temperature: float = 1.0,
                       weighting: str = "cross_entropy") -> Tensor:
    """BNext's loss from several teachers (hpi-xnor/BNext, `src/train_assistant_group_amp.py`,
    `train`, with `utils/KD_loss.py`'s DistributionLoss): L_k, the soft-target cross-entropy
    -sum_c softmax(t_k)_c log_softmax(s)_c averaged over the batch, weighted by the batch mean
    of alpha_k, and summed over the K teachers divided by K:

        loss = 1/K sum_k L_k mean_n alpha_k(n),   alpha(n) = softmax_k(CE_k(n)), detached

    where CE_k(n) is sample n's soft-target cross-entropy to teacher k: each sample leans on
    the teacher it is further from. `equal` weighting is alpha_k = 1/K (the code's without its
    `hard_knowledge`). The code's temperature is 1; another divides all logits by T and
    multiplies the loss by T^2.

    Args:
        student: the student's logits, (N, C).
        teachers: each teacher's logits, (N, C).
        temperature: T.
        weighting: `cross_entropy` (the code's) or `equal`.

    Returns:
        The loss.
    """
    choose("distill.weighting", weighting, WEIGHTINGS)
    t, k = temperature, len(teachers)
    log_p = F.log_softmax(student / t, 1)
    ce = torch.stack([-(F.softmax(x / t, 1) * log_p).sum(1) for x in teachers], 1)  # (N, K)
    alpha = torch.softmax(ce.detach(), 1) if weighting == "cross_entropy" else torch.full_like(ce, 1 / k)
    return (ce.mean(0) * alpha.mean(0)).sum() / k * t * t


def assistant_index(epoch: int, epochs: int, count: int) -> int:
    """Which of `count` assistants teaches in `epoch` (from 0) of `epochs`: each its share of
    the epochs in turn, by BNext's rule (`train`: the first k with epoch / (epochs / count) < k),
    so 512 epochs with 3 assistants switch at epochs 171 and 342.

    Args:
        epoch: the epoch.
        epochs: the stage's epochs.
        count: the assistants.

    Returns:
        The index of the assistant.
    """
    share = epochs / count
    return next((k - 1 for k in range(1, count + 1) if epoch / share < k), count - 1)


def attention_map(features: Tensor) -> Tensor:
    """Real-to-Binary Net's spatial attention as larq-zoo computes it (`larq_zoo/training/
    knowledge_distillation/knowledge_distillation.py`, `_normalized_attention_vector`): the
    mean over channels of the squared activations, per sample, flattened and divided by its
    largest value.

    Args:
        features: an (N, C, H, W) feature map.

    Returns:
        The (N, H x W) attention maps.
    """
    q = features.to(torch.promote_types(features.dtype, torch.float32)).pow(2).mean(1).flatten(1)
    return q / q.amax(1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def attention_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """larq-zoo's attention matching of one pair of layers: the mean over positions of
    (Q_S - Q_T)^2 (`attention_map`), averaged over the batch. The channels may differ.

    Args:
        student: the student's (N, C_S, H, W) feature map.
        teacher: the teacher's (N, C_T, H, W) feature map.

    Returns:
        The loss.
    """
    return (attention_map(student) - attention_map(teacher)).pow(2).mean(1).mean()
