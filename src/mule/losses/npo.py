"""NPO: negative preference optimisation (Zhang, Lin, Bai, Mei, COLM 2024, arXiv 2404.05868).

Per forget example e, with r_e = log pi_theta(y|x) - log pi_ref(y|x) summed over the answer tokens:

    L = sum_{e in F} W_e * (-(2 / beta) log sigmoid(-beta r_e)) + lambda * NLL_R

pi_ref is the base model (in mule: the same weights with the LoRA adapter disabled). At initialisation
r_e = 0, so each forget term is (2 / beta) ln 2, and its gradient is 2 sigmoid(beta r_e) grad r_e = grad log
pi_theta(y|x): gradient ascent on the *summed* answer log-likelihood, i.e. T_e times the gradient of GA's
per-example mean. The retain term (NPO + RT) is the mean answer NLL of the other examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mule.losses.tokens import example_sum, metric, token_logprobs


def npo_loss(student_logits: torch.Tensor, reference_logprobs: torch.Tensor, labels: torch.Tensor,
             weights: torch.Tensor, example: torch.Tensor, forget: torch.Tensor, beta: float = 0.1,
             retain_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V); reference_logprobs, labels, weights, example: (N,); forget: (N,) bool.

    W_e = sum of example e's position weights; positions with weight 0 are left out of r_e.
    """
    logp = token_logprobs(student_logits, labels)  # (N,)
    w = weights.to(logp.dtype)
    f = forget.to(logp.dtype)
    live = (w > 0).to(logp.dtype)
    ratio = example_sum((logp - reference_logprobs.detach().float()) * live * f, example)  # (B,) r_e
    example_weight = example_sum(w * f, example)  # (B,) W_e, zero for retain examples
    npo = -(2.0 / beta) * F.logsigmoid(-beta * ratio)  # (B,)
    forget_term = (example_weight * npo).sum()
    retain_term = -(w * logp * (1 - f)).sum()
    loss = forget_term + retain_weight * retain_term
    return loss, {"npo": metric(forget_term), "retain_nll": metric(retain_term),
                  "log_ratio": metric((example_weight * ratio).sum() / example_weight.sum().clamp_min(1e-12))}
