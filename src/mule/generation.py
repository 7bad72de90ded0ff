"""Batched greedy generation with left padding and a KV cache (teacher targets; evaluation)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
                    desc: str = "generating", progress: bool = True) -> list[str]:
    """Greedy continuations of token-id prompts, decoded without special tokens, in input order.

    Prompts are sorted by length so each batch pads little; `generate` keeps a KV cache and stops a row at
    the end-of-turn token.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="seq")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return outputs
