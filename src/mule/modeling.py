"""Logits at response positions only, and a frozen teacher's prompt keys/values computed once.

Never materialise (B, T, V): run the decoder body, gather the hidden states at the response positions,
then apply the LM head to those rows only (DESIGN.md, performance design).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_logits(lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(N, H) hidden states -> (N, V) logits, with the final-logit scaling some families apply."""
    logits = lm.get_output_embeddings()(hidden)
    config = lm.config
    scale = getattr(config, "logit_scale", None)  # Cohere
    if scale:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def expand_prefix(prefix: list[tuple[torch.Tensor, torch.Tensor]], batch: int, config) -> DynamicCache:
    """A cache holding a (1, heads, P, d) prefix broadcast to `batch` rows, without copying it."""
    data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in prefix]
    return DynamicCache(ddp_cache_data=data, config=config)


def cache_kwarg(module: nn.Module) -> str:
    """transformers >= 5.24 names the cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class ResponseLogits(nn.Module):
    """forward(ids, mask, rows, cols) -> (N, V) logits of the rows/cols positions, in the model's dtype.

    Wraps the (peft) model so that `accelerate` can put DDP/FSDP around one module whose forward is the
    whole student pass. With `prefix` (keys/values of a shared prompt prefix of length P), `ids` continue that
    prefix and positions start at P. A bf16/fp16 model on a GPU runs under autocast, so fp32 LoRA weights
    compute in half precision and save half-precision activations (see `half_precision_lora`). The logits
    stay in the model's dtype: the losses gather K values per row and only those become fp32.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        dtype = causal_lm(model).dtype
        self.autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None,
                cols: torch.Tensor | None, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                prefix_ids: torch.Tensor | None = None):
        """`prefix_ids` (1, P): a prompt part every row shares, run once in this same call (with gradients, the
        student's system part) instead of once per row; its keys/values then serve as `prefix`."""
        if self.autocast is not None and ids.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.autocast):
                return self._forward(ids, mask, rows, cols, prefix, prefix_ids)
        return self._forward(ids, mask, rows, cols, prefix, prefix_ids)

    def _prefix_kv(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = causal_lm(self.model).get_decoder()(input_ids=ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _forward(self, ids, mask, rows, cols, prefix, prefix_ids=None):
        lm = causal_lm(self.model)
        if rows is None:  # prefix mode: return the per-layer keys/values of `ids` (1, P)
            return self._prefix_kv(ids)
        if prefix_ids is not None:
            prefix = self._prefix_kv(prefix_ids)
        kwargs = {}
        if prefix is not None:
            p = prefix[0][0].shape[2]
            kwargs[cache_kwarg(lm.get_decoder())] = expand_prefix(prefix, ids.shape[0], lm.config)
            mask = torch.cat([mask.new_ones(ids.shape[0], p), mask], dim=1)
            kwargs["position_ids"] = torch.arange(p, p + ids.shape[1], device=ids.device).unsqueeze(0)
        out = lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=prefix is not None, **kwargs)
        hidden = out.last_hidden_state[rows, cols]  # (N, H)
        return lm_head_logits(lm, hidden)  # (N, V)


def half_precision_lora(model: nn.Module) -> None:
    """Stop peft from copying each LoRA layer's input to fp32 (its adapter weights' dtype).

    Those copies are saved for backward: at 8B, batch 32 x 128, they cost about 20 GB. Under autocast the
    adapter matmuls run in bf16 on bf16 inputs while the adapter weights (and AdamW's state) stay fp32.
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
