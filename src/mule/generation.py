"""Batched greedy generation with a KV cache (teacher targets; evaluation).

Every prompt of one call usually starts with the same system part (an intention prompt of a few hundred tokens).
With `prefix`, its keys/values are computed once and every batch continues from them: rows are laid out as
[prefix][left padding][body], the padding masked out and positions counted from the attention mask, so each row
sees exactly prefix + body. Without it, rows are left-padded whole prompts.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mule.modeling import ResponseLogits, cache_kwarg, expand_prefix


def prefix_layout(prompts: list[list[int]], chunk: list[int], pad: int, prefix: list[int]) -> tuple:
    """ids and mask (B, P + W): the prefix, then each body right-aligned after left padding."""
    width = max(len(prompts[i]) for i in chunk)
    ids = torch.full((len(chunk), len(prefix) + width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    mask[:, : len(prefix)] = 1
    for row, i in enumerate(chunk):
        ids[row, ids.shape[1] - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[row, ids.shape[1] - len(prompts[i]) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                    desc: str = "generating", progress: bool = True, prefix: list[int] | None = None) -> list[str]:
    """Greedy continuations of `prefix + prompts[i]`, decoded without special tokens, in input order.

    Prompts are sorted by length so each batch pads little; `generate` stops a row at the end-of-turn token.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prefix = list(prefix or [])
    kv = ResponseLogits(model)(torch.tensor([prefix], device=device), None, None, None) if prefix else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="seq")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = prefix_layout(prompts, chunk, pad, prefix)
        extra = {cache_kwarg(model): expand_prefix(kv, len(chunk), model.config)} if kv else {}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None, **extra)
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return outputs
