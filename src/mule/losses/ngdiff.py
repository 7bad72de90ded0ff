"""NGDiff: normalised gradient difference with an adaptive learning rate (Jin et al., NAACL 2025,
arXiv 2410.22086; METHOD_SPEC 4.5), extended to the three objectives.

Direction, on flat fp32 gradient vectors g_i of each objective's *minimised* loss (ascent components enter
as the gradient of -NLL):

    d = sum_i g_i / ||g_i||        (two tasks: g_R/||g_R|| - g_F/||g_F||),   theta <- theta - eta d

AutoLR is GeN's parabola fit (Bu & Xu, ICLR 2025): probe the descent loss at theta - x d for a few step sizes
x around eta, fit L(x) - L(0) ~ A x^2 / 2 - B x by least squares, and move eta towards B / A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalized_sum(grads: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """sum_i g_i / ||g_i|| over flat (P,) vectors; a zero gradient contributes nothing. Returns (P,) fp32."""
    out = torch.zeros_like(grads[0], dtype=torch.float32)
    for g in grads:
        norm = g.float().norm()
        if norm > eps:
            out.add_(g.float(), alpha=float(1.0 / norm))
    return out


def fit_parabola(steps: Sequence[float], deltas: Sequence[float]) -> tuple[float, float, float]:
    """Least squares fit of delta(x) = A x^2 / 2 - B x through the origin; returns (A, B, R^2).

    steps: the probed step sizes x; deltas: L(theta - x d) - L(theta). R^2 is 1 for an exact fit.
    """
    x = torch.tensor(steps, dtype=torch.float64)
    y = torch.tensor(deltas, dtype=torch.float64)
    design = torch.stack([x * x / 2, -x], dim=1)  # (n, 2)
    coef = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    residual = float(((design @ coef - y) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 0.0
    return float(coef[0]), float(coef[1]), r2


def update_lr(eta: float, a: float, b: float, r2: float, min_r2: float = 0.99, momentum: float = 0.9) -> float:
    """GeN's update: eta <- 0.1 clip(B/A, eta/2, 2 eta) + 0.9 eta when A > 0, B > 0 and R^2 > min_r2, else eta / 2."""
    if a > 0 and b > 0 and r2 > min_r2:
        target = min(max(b / a, eta / 2), 2 * eta)
        return (1 - momentum) * target + momentum * eta
    return eta / 2
