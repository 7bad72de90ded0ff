"""Gradient projection: MOLLM's "projection" variant (METHOD_SPEC 4.6; the orthogonal projection of FedOSD).

The unlearning gradient u (sum of the forget-type objectives' gradients) is projected onto the orthogonal
complement of the retain-type gradients G (k x P), then rescaled to ||u||:

    d = u - G^T (G G^T)^+ G u,      d <- d * ||u|| / ||d||

so a step theta <- theta - eta d leaves every retain-type loss unchanged to first order (d . g_r = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def project_out(u: torch.Tensor, basis: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """u (P,) with the span of `basis` (k vectors of shape (P,)) removed, rescaled to ||u||. Returns (P,) fp32."""
    u = u.float()
    if not basis:
        return u.clone()
    k = len(basis)
    gram = torch.empty(k, k, dtype=torch.float64)  # G G^T, pairwise: no stacked copy of the gradients
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = float(basis[i].float() @ basis[j].float())
    gu = torch.tensor([float(b.float() @ u) for b in basis], dtype=torch.float64)  # G u
    coef = torch.linalg.pinv(gram, hermitian=True) @ gu  # (k,)
    d = u.clone()
    for c, b in zip(coef.tolist(), basis):
        d.sub_(b.float(), alpha=c)
    norm = d.norm()
    return d * (u.norm() / norm) if norm > eps else torch.zeros_like(u)
