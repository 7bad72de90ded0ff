"""RMU: representation misdirection for unlearning (Li et al., ICML 2024, the WMDP paper, arXiv 2403.03218).

At one decoder layer l, with h the student's hidden state (after layer l) at a response position, h_ref the
base model's (adapter disabled) at the same position, u a fixed random unit vector and c the steering
coefficient:

    L = sum_{n in F} w_n mean_j (h_n,j - c u_j)^2 + alpha * sum_{n in R} w_n mean_j (h_n,j - h_ref_n,j)^2

Forget-type activations are pushed to a scaled random direction; retain-type ones are held at the base's.
WMDP's defaults (Zephyr-7B): l = 7, c = 6.5, alpha = 1200.
"""

from __future__ import annotations

import torch

from mule.losses.tokens import metric


def control_vector(hidden_size: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """c * u with u ~ U[0, 1)^H normalised to unit length, as in WMDP's RMU. Returns (H,) fp32."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=generator)
    return steering_coeff * u / u.norm()


def rmu_loss(hidden: torch.Tensor, reference_hidden: torch.Tensor, control: torch.Tensor, weights: torch.Tensor,
             forget: torch.Tensor, retain_weight: float = 1200.0) -> tuple[torch.Tensor, dict[str, float]]:
    """hidden: (N, H) with grad; reference_hidden: (N, H), read at retain-type rows only; control: (H,);
    weights: (N,); forget: (N,) bool."""
    h = hidden.float()
    f = forget.to(h.dtype)
    w = weights.to(h.dtype)
    misdirect = ((h - control.to(h)) ** 2).mean(-1)  # (N,)
    reference = torch.where(forget.unsqueeze(-1), h.detach(), reference_hidden.detach().float())
    keep = ((h - reference) ** 2).mean(-1)  # (N,)
    forget_term = (w * f * misdirect).sum()
    retain_term = (w * (1 - f) * keep).sum()
    loss = forget_term + retain_weight * retain_term
    return loss, {"misdirect": metric(forget_term), "retain_mse": metric(retain_term)}
