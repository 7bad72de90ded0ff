"""BiLD: bi-directional logits-difference loss (Li, Zhou, Song, COLING 2025, arXiv 2406.13555), as released.

For an index set S of size k ordered by the selecting model's logits, form all k(k-1)/2 pairwise differences
Delta_ij = (z_i - z_j) / tau, i < j, for teacher and student; LD(S) = KL(softmax(Delta^R) || softmax(Delta^S)).
BiLD = LD(teacher top-k) + LD(student top-k). Used for the paper's Table 2 ablation "Ours w/ BiLD loss"
(METHOD_SPEC 4.10; the paper's prose describes a symmetric KL instead, the released code does this).
"""

from __future__ import annotations

import torch


def _pair_log_probs(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, k) logits ordered by the selector -> (N, k(k-1)/2) log-softmax over pairwise differences."""
    k = logits.shape[-1]
    i, j = torch.triu_indices(k, k, offset=1, device=logits.device)
    diffs = (logits[:, i] - logits[:, j]) / tau
    return diffs.log_softmax(-1)


def logit_difference_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor,
                        tau: float) -> torch.Tensor:
    """LD(S) per position: KL(p^R || p^S) over the pairs of `index` (N, k). Returns (N,)."""
    log_p_teacher = _pair_log_probs(teacher_logits.gather(-1, index).float(), tau)
    log_p_student = _pair_log_probs(student_logits.gather(-1, index).float(), tau)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def bild_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
              k: int = 8, tau: float = 3.0) -> tuple[torch.Tensor, dict[str, float]]:
    """t-LD + s-LD reduced as sum_n weights[n] * l_n. student/teacher logits: (N, V); weights: (N,)."""
    teacher_logits = teacher_logits.detach()
    k = min(k, student_logits.shape[-1])
    idx_teacher = teacher_logits.topk(k, dim=-1).indices  # sorted: ordered by the teacher's logits
    idx_student = student_logits.detach().topk(k, dim=-1).indices
    t_ld = logit_difference_kl(student_logits, teacher_logits, idx_teacher, tau)
    s_ld = logit_difference_kl(student_logits, teacher_logits, idx_student, tau)
    weights = weights.to(t_ld.dtype)
    loss = (weights * (t_ld + s_ld)).sum()
    with torch.no_grad():
        return loss, {"t_ld": float((weights * t_ld).sum()), "s_ld": float((weights * s_ld).sum())}
