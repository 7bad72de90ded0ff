"""Supervised fine-tuning: negative log-likelihood of the target response tokens.

    L = - sum_n w_n log softmax(z_n)[y_n]

Used by SFT refusal tuning (METHOD_SPEC 4.4: refusals for forget and prefilled queries, gold answers for the
rest) and by target preparation (`mule prepare`). With w_n = 1 / (B * T_e) this is the mean token NLL per
example, averaged over the batch.
"""

from __future__ import annotations

import torch


def sft_loss(student_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); targets: (N,) token ids; weights: (N,). Returns the scalar loss and metrics."""
    logp = student_logits.float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    loss = -(weights.to(logp.dtype) * logp).sum()
    with torch.no_grad():
        acc = (student_logits.argmax(-1) == targets).float()
        metrics = {"nll": float(loss), "token_acc": float((weights * acc).sum() / weights.sum().clamp_min(1e-12))}
    return loss, metrics
