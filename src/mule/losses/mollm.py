"""MOLLM's per-objective losses (Pan et al., ICASSP 2025, arXiv 2412.20412; METHOD_SPEC 4.6).

Forget-type examples take the unlearning cross-entropy, which cannot explode as p -> 0 (the form of the same
first author's FedOSD code; MOLLM's exact form may be -log(1 - p), an open point in METHOD_SPEC):

    UCE = -log(1 - p(y_n) / 2),    L = sum_{n in F} w_n UCE_n + sum_{n in R} w_n NLL_n

The loop evaluates this on one objective's examples at a time and combines the objectives' gradients with
the min-norm common descent direction (`mule.losses.mgda`) or the projection variant (`mule.losses.projection`).
"""

from __future__ import annotations

import torch

from mule.losses.tokens import metric, token_logprobs


def unlearning_cross_entropy(logp: torch.Tensor) -> torch.Tensor:
    """-log(1 - p / 2) from log p, elementwise. Bounded by log 2; its minimum 0 is at p = 0."""
    return -torch.log1p(-logp.exp() / 2)


def mollm_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, forget: torch.Tensor
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); labels, weights: (N,); forget: (N,) bool, True at forget-type positions."""
    logp = token_logprobs(student_logits, labels)  # (N,)
    w = weights.to(logp.dtype)
    f = forget.to(logp.dtype)
    uce = (w * f * unlearning_cross_entropy(logp)).sum()
    nll = -(w * (1 - f) * logp).sum()
    return uce + nll, {"uce": metric(uce), "retain_nll": metric(nll)}
