"""GradDiff: ascent on the forget answers, descent on the retain answers.

Liu, Liu, Stone, CoLLAs 2022 (arXiv 2203.12817), the "Grad. Diff." baseline of TOFU (Maini et al. 2024).

    L = -NLL_F + lambda * NLL_R = sum_{n in F} w_n log p(y_n) - lambda * sum_{n in R} w_n log p(y_n)

F: positions of forget-type examples (forget, adversarial, positive anchors); R: all others. With weights that
average within each group (the loop's `mean_over = "role"`) the two terms are the group means. NGDiff uses
this loss per objective with lambda = 1: on one objective's examples it is either -NLL or +NLL.
"""

from __future__ import annotations

import torch

from mule.losses.tokens import metric, token_logprobs


def graddiff_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  forget: torch.Tensor, retain_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); labels, weights: (N,); forget: (N,) bool, True at forget-type positions."""
    logp = token_logprobs(student_logits, labels)  # (N,)
    weighted = weights.to(logp.dtype) * logp
    f = forget.to(logp.dtype)
    ascend = (weighted * f).sum()  # -NLL_F
    descend = -(weighted * (1 - f)).sum()  # NLL_R
    loss = ascend + retain_weight * descend
    return loss, {"forget_nll": -metric(ascend), "retain_nll": metric(descend)}
