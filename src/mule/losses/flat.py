"""FLAT: loss adjustment with only forget data (Wang et al., ICLR 2025, arXiv 2410.11143; METHOD_SPEC 4.3).

Per forget example e with its forget answer y_f and a refusal template y_e (the "good" answer), with the mean
token probabilities P_e = mean_t p(y_e,t | x, y_e,<t) and P_f = mean_t p(y_f,t | x, y_f,<t):

    L = sum_e W_e * ( -g*(P_e) + f*(g*(P_f)) )

the negative variational lower bound of the f-divergence between the good and the forget answers, with the
activation g* and the convex conjugate f* of the chosen divergence (f-GAN, Nowozin et al. 2016, Table 2):

    divergence  f(u)                            g*(v)                    f*(t)
    tv          |u - 1| / 2                     tanh(v) / 2              t            (|t| <= 1/2)
    kl          u log u                         v                        exp(t - 1)
    js          u log u - (u+1) log((u+1)/2)    log 2 - log(1 + e^-v)    -log(2 - e^t)  (t < log 2)
    pearson     (u - 1)^2                       v                        t^2 / 4 + t

Total variation is the default (the released `forget.yaml`). The mean is over answer tokens only (the release
averages over all padded positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mule.losses.tokens import example_sum, metric, token_logprobs

Fn = Callable[[torch.Tensor], torch.Tensor]

# divergence -> (activation g*, conjugate f*)
DIVERGENCES: dict[str, tuple[Fn, Fn]] = {
    "tv": (lambda v: torch.tanh(v) / 2, lambda t: t),
    "kl": (lambda v: v, lambda t: torch.exp(t - 1)),
    "js": (lambda v: math.log(2) - F.softplus(-v), lambda t: -torch.log(2 - torch.exp(t))),
    "pearson": (lambda v: v, lambda t: t * t / 4 + t),
}


def flat_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, example: torch.Tensor,
              good: torch.Tensor, divergence: str = "tv") -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits: (N, V) over both answers of every example; labels, weights, example: (N,);
    good: (N,) bool, True at the template answer's positions. W_e = the weights of e's forget-answer positions."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    activation, conjugate = DIVERGENCES[divergence]
    p = token_logprobs(student_logits, labels).exp()  # (N,)
    w = weights.to(p.dtype)
    g = good.to(p.dtype)
    w_good, w_bad = example_sum(w * g, example), example_sum(w * (1 - g), example)  # (B,)
    p_good = example_sum(w * g * p, example) / w_good.clamp_min(1e-30)  # (B,) P_e
    p_bad = example_sum(w * (1 - g) * p, example) / w_bad.clamp_min(1e-30)  # (B,) P_f
    per_example = -activation(p_good) + conjugate(activation(p_bad))  # (B,)
    loss = (w_bad * per_example).sum()
    total = w_bad.sum().clamp_min(1e-30)
    return loss, {"p_template": metric((w_bad * p_good).sum() / total), "p_forget": metric((w_bad * p_bad).sum() / total)}
