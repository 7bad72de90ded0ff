"""Multiple-choice scoring by the answer-letter logits at the first assistant position (METHOD_SPEC 5.2)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mule.generation import prefix_layout
from mule.modeling import ResponseLogits, cache_kwarg, expand_prefix
from mule.records import MCQRecord

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class ShuffledMCQ:
    record: MCQRecord
    order: list[int]  # order[i] = index into record.choices shown as letter i

    @property
    def gold_letter(self) -> int:
        return self.order.index(self.record.answer_index)

    @property
    def refusal_letter(self) -> int | None:
        r = self.record.refusal_index
        return None if r is None else self.order.index(r)

    def prompt(self) -> str:
        lines = [f"Question: {self.record.question}"]
        lines += [f"{LETTERS[i]}. {self.record.choices[j]}" for i, j in enumerate(self.order)]
        return "\n".join(lines) + "\nAnswer with the letter only."


def shuffle(record: MCQRecord, seed: int) -> ShuffledMCQ:
    """Options shuffled with a generator seeded by (seed, record id): the same order for every model."""
    order = list(range(len(record.choices)))
    random.Random(f"{seed}:{record.id}").shuffle(order)
    return ShuffledMCQ(record, order)


def letter_token_ids(tokenizer, n: int) -> list[list[int]]:
    """For each letter, the ids that open it: "A" and " A" (the model may emit either)."""
    out = []
    for letter in LETTERS[:n]:
        ids = {tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in (letter, " " + letter)}
        out.append(sorted(ids))
    return out


@torch.no_grad()
def last_token_logits(model, prompts: list[list[int]], pad_id: int, batch_size: int = 16,
                      desc: str = "scoring", progress: bool = True, prefix: list[int] | None = None) -> torch.Tensor:
    """(n, V) next-token logits after `prefix + prompts[i]`: logits of the last position only.

    Rows are [prefix][left padding][prompt]; the shared prefix's keys/values are computed once (see
    `mule.generation`), and positions are counted from the attention mask.
    """
    device = next(model.parameters()).device
    prefix = list(prefix or [])
    kv = ResponseLogits(model)(torch.tensor([prefix], device=device), None, None, None) if prefix else None
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = order[start : start + batch_size]
        ids, mask = prefix_layout(prompts, chunk, pad_id, prefix)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        p = len(prefix)
        kwargs = {cache_kwarg(model): expand_prefix(kv, len(chunk), model.config)} if kv else {}
        logits = model(input_ids=ids[:, p:].to(device), attention_mask=mask.to(device),
                       position_ids=positions[:, p:].to(device), logits_to_keep=1, **kwargs).logits[:, -1].float()
        for row, i in enumerate(chunk):
            out[i] = logits[row].cpu()
    return torch.stack(out) if out else torch.empty(0)


def pick_letters(logits: torch.Tensor, items: list[ShuffledMCQ], letter_ids: list[list[int]]) -> list[int]:
    """The chosen option of each item: argmax over its letters of the best logit among each letter's ids."""
    picks = []
    for row, item in zip(logits, items):
        n = len(item.order)
        scores = torch.stack([row[letter_ids[i]].max() for i in range(n)])
        picks.append(int(scores.argmax()))
    return picks


def mcq_metrics(items: list[ShuffledMCQ], picks: list[int]) -> dict[str, float]:
    """Accuracy % and, where items have a refusal option, the % of items where it was picked."""
    acc = 100.0 * sum(p == it.gold_letter for it, p in zip(items, picks)) / len(items)
    with_refusal = [(it, p) for it, p in zip(items, picks) if it.refusal_letter is not None]
    out = {"accuracy": acc}
    if with_refusal:
        out["refusal"] = 100.0 * sum(p == it.refusal_letter for it, p in with_refusal) / len(with_refusal)
    return out
