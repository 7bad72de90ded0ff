"""SimNPO: NPO without a reference model (Fan et al. 2025, arXiv 2410.07163; METHOD_SPEC 4.2).

Per forget example e, with the length-normalised log-likelihood m_e = (1/|y|) log pi_theta(y|x):

    L = sum_{e in F} W_e * (-(2 / beta) log sigmoid(-beta m_e - gamma)) + lambda * NLL_R

gamma is the reward margin: a margin gamma gives the loss of gamma = 0 at m_e + gamma / beta.
Defaults are the MUSE-Books recipe: beta = 0.7, gamma = 0, lambda = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mule.losses.tokens import example_sum, metric, token_logprobs


def simnpo_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, example: torch.Tensor,
                forget: torch.Tensor, beta: float = 0.7, gamma: float = 0.0, retain_weight: float = 0.1
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); labels, weights, example: (N,); forget: (N,) bool.

    m_e is the weighted mean of the example's token log-probs (the plain mean when its weights are equal).
    """
    logp = token_logprobs(student_logits, labels)  # (N,)
    w = weights.to(logp.dtype)
    f = forget.to(logp.dtype)
    example_weight = example_sum(w * f, example)  # (B,) W_e
    mean_logp = example_sum(w * f * logp, example) / example_weight.clamp_min(1e-30)  # (B,) m_e
    simnpo = -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma)  # (B,)
    forget_term = (example_weight * simnpo).sum()
    retain_term = -(w * logp * (1 - f)).sum()
    loss = forget_term + retain_weight * retain_term
    return loss, {"simnpo": metric(forget_term), "retain_nll": metric(retain_term)}
