"""Bidirectional top-K logit distillation, the paper's Eq. 3 (arXiv 2604.15482, METHOD_SPEC 3.1).

    l_t = sum_{i in TopK(z^R_t)} SL1_b(z^S_t[i] - z^R_t[i]) + alpha * sum_{j in TopK(sg(z^S_t))} SL1_b(z^S_t[j] - z^R_t[j])

The first term imitates the teacher on its most likely tokens (refusal or utility behaviour); the second
pulls the student's own confident tokens (the "stubborn" forget knowledge) to the teacher's values.
Raw logits, no softmax or temperature; an index in both sets counts in both sums. `center=True` is METHOD_SPEC
3.6's centring ablation: each row's logsumexp is subtracted first, so the terms compare log-probabilities. A system
prompt shifts a small model's whole logit row (SmolLM2-135M's prompted teacher sits 0.7-7.5 above the student at the
first answer position), and on raw logits both terms then spend their pull on that shift: the suppression term even
*raises* the student's own top-K, whose teacher values are higher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_smooth_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor,
                   beta: float, shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_{i in index[n]} SL1_beta(z^S[n, i] - z^R[n, i]) for each position n.

    student_logits, teacher_logits: (N, V); index: (N, K) token ids; `shift`: (N, 1) per-row values subtracted
    from the gathered student and teacher values (their logsumexp, for centred matching). Returns (N,), in fp32.
    """
    s = student_logits.gather(-1, index).float()  # (N, K)
    t = teacher_logits.gather(-1, index).float()  # (N, K)
    if shift is not None:
        s, t = s - shift[0], t - shift[1]
    return F.smooth_l1_loss(s, t, beta=beta, reduction="none").sum(-1)


def row_logsumexp(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, 1), (N, 1)) logsumexp of each row, in fp32: subtracted from gathered values it centres them without
    making a centred copy of the (N, V) logits; top-K sets are the same on centred and raw rows."""
    return (student_logits.float().logsumexp(-1, keepdim=True),
            teacher_logits.float().logsumexp(-1, keepdim=True))


def bidirectional_topk_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                            k: int = 10, alpha: float = 1.0, beta: float = 1.0, center: bool = False
                            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 3 reduced as sum_n weights[n] * l_n.

    student_logits: (N, V) with grad; teacher_logits: (N, V), treated as constants; weights: (N,).
    Returns the scalar loss and metrics: the two terms, and how many of the student's top-K the teacher shares.
    """
    teacher_logits = teacher_logits.detach()
    shift = row_logsumexp(student_logits, teacher_logits) if center else None
    k = min(k, student_logits.shape[-1])
    idx_teacher = teacher_logits.topk(k, dim=-1).indices  # (N, K) C^R_t
    idx_student = student_logits.detach().topk(k, dim=-1).indices  # (N, K) C^S_t, chosen from detached values
    imitate = topk_smooth_l1(student_logits, teacher_logits, idx_teacher, beta, shift)  # (N,)
    suppress = topk_smooth_l1(student_logits, teacher_logits, idx_student, beta, shift)  # (N,)
    weights = weights.to(imitate.dtype)
    loss = (weights * (imitate + alpha * suppress)).sum()
    overlap = (idx_student.unsqueeze(-1) == idx_teacher.unsqueeze(-2)).any(-1).float().mean(-1)  # (N,)
    with torch.no_grad():
        metrics = {"imitate": float((weights * imitate).sum()), "suppress": float((weights * suppress).sum()),
                   "topk_overlap": float((weights * overlap).sum() / weights.sum().clamp_min(1e-12))}
    return loss, metrics
