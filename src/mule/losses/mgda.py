"""MGDA: the min-norm common descent direction over normalised objective gradients (Desideri 2012; Sener &
Koltun, NeurIPS 2018), as MOLLM's update (Pan et al., ICASSP 2025; METHOD_SPEC 4.6).

With unit vectors u_i = g_i / ||g_i|| and their Gram matrix G_ij = u_i . u_j (m x m),

    lambda* = argmin_{lambda in simplex} lambda^T G lambda,     d = sum_i lambda*_i u_i

At the optimum d . u_i >= ||d||^2 >= 0 for every i: a step theta <- theta - eta d decreases no objective to
first order. d = 0 means the point is Pareto-stationary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def _exact_weights(g: torch.Tensor) -> torch.Tensor | None:
    """Small m: for every support S solve the equality-constrained problem (G_S lam + nu 1 = 0, 1^T lam = 1) and
    keep the best solution that lies in the simplex. The optimum is among them: exact, no iterations."""
    m = g.shape[0]
    best, best_value = None, float("inf")
    for size in range(1, m + 1):
        for support in itertools.combinations(range(m), size):
            idx = list(support)
            kkt = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            kkt[:size, :size] = g[idx][:, idx]
            kkt[:size, size] = kkt[size, :size] = 1.0
            rhs = torch.zeros(size + 1, dtype=torch.float64)
            rhs[size] = 1.0
            solution = torch.linalg.pinv(kkt) @ rhs
            if float((kkt @ solution - rhs).abs().max()) > 1e-9 or float(solution[:size].min()) < -1e-12:
                continue
            lam = torch.zeros(m, dtype=torch.float64)
            lam[idx] = solution[:size].clamp_min(0.0)
            lam /= lam.sum()
            value = float(lam @ g @ lam)
            if value < best_value - 1e-15:
                best, best_value = lam, value
    return best


def _frank_wolfe(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    m = g.shape[0]
    lam = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for _ in range(max_iter):
        grad = g @ lam  # (m,): d . u_i for the current d
        norm_sq = lam @ grad
        t = int(torch.argmin(grad))
        if norm_sq - grad[t] <= tol:  # Frank-Wolfe duality gap
            break
        # exact line search on the segment from d to u_t: minimise ||(1-s) d + s u_t||^2 over s in [0, 1]
        denom = norm_sq - 2 * grad[t] + g[t, t]
        s = float(((norm_sq - grad[t]) / denom).clamp(0.0, 1.0)) if denom > 0 else 1.0
        lam = (1 - s) * lam
        lam[t] += s
    return lam


def min_norm_weights(gram: torch.Tensor, max_iter: int = 1000, tol: float = 1e-12) -> torch.Tensor:
    """lambda* on the simplex minimising lambda^T G lambda. gram: (m, m), symmetric PSD. Returns (m,) float64.

    Exact by enumerating supports for m <= 8 (NGDiff/MOLLM have 4 objectives); Frank-Wolfe with exact line
    search otherwise.
    """
    g = gram.double()
    exact = _exact_weights(g) if g.shape[0] <= 8 else None
    return exact if exact is not None else _frank_wolfe(g, max_iter, tol)


def common_descent(grads: Sequence[torch.Tensor], eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, lambda) over flat (P,) gradients; zero gradients are left out (weight 0). d: (P,) fp32."""
    norms = [float(g.float().norm()) for g in grads]
    live = [i for i, n in enumerate(norms) if n > eps]
    weights = torch.zeros(len(grads), dtype=torch.float64)
    d = torch.zeros_like(grads[0], dtype=torch.float32)
    if not live:
        return d, weights
    gram = torch.empty(len(live), len(live), dtype=torch.float64)
    for a, i in enumerate(live):
        for b, j in enumerate(live[a:], start=a):
            gram[a, b] = gram[b, a] = float(grads[i].float() @ grads[j].float()) / (norms[i] * norms[j])
    lam = min_norm_weights(gram)
    for a, i in enumerate(live):
        weights[i] = lam[a]
        d.add_(grads[i].float(), alpha=float(lam[a]) / norms[i])
    return d, weights
