"""DUET's uni-directional top-K logit distillation (Zhong, Yang, Zhu, ICLR 2026, arXiv 2601.21283).

    l_t = sum_{i in TopK(z^R_t)} SL1_b(z^S_t[i] - z^R_t[i])

Eq. 3 with alpha = 0 (METHOD_SPEC 4.8, 4.9). DUET's original first-decoding-position variant is the same
loss with weights only on each example's first response position (`mule.batching.position_weights`).
"""

from __future__ import annotations

import torch

from mule.losses.bitopk import row_logsumexp, topk_smooth_l1


def duet_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
              k: int = 10, beta: float = 1.0, center: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits, teacher_logits: (N, V); weights: (N,). Returns the scalar loss and metrics.
    `center`: compare log-probabilities instead of raw logits (see `mule.losses.bitopk`)."""
    teacher_logits = teacher_logits.detach()
    shift = row_logsumexp(student_logits, teacher_logits) if center else None
    idx_teacher = teacher_logits.topk(min(k, teacher_logits.shape[-1]), dim=-1).indices  # (N, K)
    imitate = topk_smooth_l1(student_logits, teacher_logits, idx_teacher, beta, shift)  # (N,)
    loss = (weights.to(imitate.dtype) * imitate).sum()
    return loss, {"imitate": float(loss.detach())}
