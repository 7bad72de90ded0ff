"""Supervised fine-tuning: negative log-likelihood of the target response tokens.

    L = - sum_n w_n log softmax(z_n)[y_n]

Used by SFT refusal tuning (METHOD_SPEC 4.4: refusal templates for forget, prefilled and positive-anchor
queries, gold answers for the rest; after a prefill only the continuation is a target) and by target
preparation (`mule prepare`). With w_n = 1 / (B * T_e) this is the mean token NLL per example, averaged over
the batch.
"""

from __future__ import annotations

import torch

from mule.losses.tokens import token_logprobs


def sft_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); labels: (N,) token ids; weights: (N,). Returns the scalar loss and metrics."""
    logp = token_logprobs(student_logits, labels)  # (N,)
    loss = -(weights.to(logp.dtype) * logp).sum()
    with torch.no_grad():
        acc = (student_logits.argmax(-1) == labels).float()
        metrics = {"nll": float(loss), "token_acc": float((weights * acc).sum() / weights.sum().clamp_min(1e-12))}
    return loss, metrics
