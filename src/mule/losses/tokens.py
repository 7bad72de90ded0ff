"""Shared pieces of the likelihood losses: token log-probabilities and per-example sums.

Positions are flat: position n belongs to example `example[n]` (its row in the batch). A position weight
w_n = 1 / (T_e * n_group) gives "mean over the example's tokens, then mean over its group", so the weights of
one example sum to its example weight W_e = 1 / n_group; w_n = 0 masks a position.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(y_n | context_n) in fp32 (fp64 stays fp64). logits: (N, V); labels: (N,) token ids. Returns (N,)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def example_sum(values: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """Sum of per-position values within each example. values, example: (N,). Returns (B,), B = max(example) + 1."""
    n = int(example.max()) + 1 if example.numel() else 0
    return values.new_zeros(n).index_add(0, example, values)


def metric(value: torch.Tensor) -> float:
    return float(value.detach())
