"""GA: gradient ascent on the forget answers (Jang et al., ACL 2023, arXiv 2210.01504; METHOD_SPEC 4.1).

    L = -E_{(x, y) in D_f} NLL(x, y) = sum_n w_n log p(y_n | x, y_<n)

Minimising L ascends the language-model loss of the forget answers. No retain term: the loop feeds only
forget-type records (forget, adversarial, positive anchors). With w_n = 1 / (B T_e) this is the mean token
log-likelihood per example, averaged over the batch.
"""

from __future__ import annotations

import torch

from mule.losses.tokens import metric, token_logprobs


def ga_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); labels: (N,) token ids; weights: (N,). Returns the scalar loss and metrics."""
    logp = token_logprobs(student_logits, labels)  # (N,)
    loss = (weights.to(logp.dtype) * logp).sum()
    return loss, {"forget_nll": -metric(loss)}
