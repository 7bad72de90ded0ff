"""Training examples -> stratified batches -> padded tensors with response positions.

Each example is tokenised as (body, response) where body = query + assistant header + prefill; the system
prefix is added by the caller (student: the template default, teacher: the objective's intention prompt),
so the response sits at the same offset from the end of the body in both contexts (METHOD_SPEC 3.2).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenizedExample:
    id: str
    objective: int
    body: list[int]  # query + assistant header + prefill
    response: list[int]  # target tokens incl. end of turn
    pair_id: str | None = None


@dataclass
class Batch:
    """Right-padded bodies+responses and the flat index of every response position.

    ids: (B, L) body + response, right-padded; mask: (B, L);
    rows, cols: (N,) batch row and column whose output predicts response token t (col = len(body) + t - 1);
    example: (N,) row of each position; position: (N,) t, 0-based; lengths: (B,) response lengths;
    objective: (B,) objective of each row.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    example: torch.Tensor
    position: torch.Tensor
    lengths: torch.Tensor
    objective: torch.Tensor
    targets: torch.Tensor  # (N,) the response token at each position

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.__dict__.items()})

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def collate(examples: list[TokenizedExample], pad_id: int) -> Batch:
    width = max(len(e.body) + len(e.response) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, cols, position, targets = [], [], [], []
    for b, e in enumerate(examples):
        seq = e.body + e.response
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        for t, token in enumerate(e.response):
            rows.append(b)
            cols.append(len(e.body) + t - 1)
            position.append(t)
            targets.append(token)
    rows_t = torch.tensor(rows, dtype=torch.long)
    return Batch(ids=ids, mask=mask, rows=rows_t, cols=torch.tensor(cols, dtype=torch.long), example=rows_t,
                 position=torch.tensor(position, dtype=torch.long),
                 lengths=torch.tensor([len(e.response) for e in examples], dtype=torch.long),
                 objective=torch.tensor([e.objective for e in examples], dtype=torch.long),
                 targets=torch.tensor(targets, dtype=torch.long))


def position_weights(batch: Batch, n_examples: int, positions: str = "all") -> torch.Tensor:
    """(N,) weights giving "mean over an example's tokens, then mean over `n_examples`" (METHOD_SPEC 3.5).

    `n_examples` is the size of the whole optimiser batch (over micro-batches and processes), so that summed
    micro-batch gradients equal the full batch's gradient. positions="first" keeps only t = 0 (DUET).
    """
    if positions == "first":
        return (batch.position == 0).float() / n_examples
    if positions != "all":
        raise ValueError(f"positions must be 'all' or 'first', got {positions!r}")
    return 1.0 / (batch.lengths[batch.example].float() * n_examples)


def stratified_batches(examples: list[TokenizedExample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices of each batch: objectives interleaved evenly, anchor pairs never split across batches.

    Deterministic in (seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one.
    """
    rng = random.Random(f"{seed}-{epoch}")
    units: dict[object, list[int]] = {}
    for i, e in enumerate(examples):
        units.setdefault(e.pair_id if e.pair_id is not None else ("single", i), []).append(i)
    by_objective: dict[int, list[list[int]]] = {}
    for unit in units.values():
        by_objective.setdefault(examples[unit[0]].objective, []).append(unit)
    keyed = []
    for objective in sorted(by_objective):
        group = by_objective[objective]
        rng.shuffle(group)
        offset = rng.random()
        keyed += [((rank + offset) / len(group), objective, unit) for rank, unit in enumerate(group)]
    keyed.sort(key=lambda item: (item[0], item[1]))
    batches: list[list[int]] = [[]]
    for _, _, unit in keyed:
        if batches[-1] and len(batches[-1]) + len(unit) > batch_size:
            batches.append([])
        batches[-1].extend(unit)
    return [b for b in batches if b]


def length_grouped_batches(examples: list[TokenizedExample], batch_size: int, seed: int, epoch: int,
                           window: int = 50) -> list[list[int]]:
    """Batches of similar length (little padding), in random order: shuffle, sort within windows of
    `window` batches, cut, shuffle the batches. For data without anchor pairs (target preparation)."""
    rng = random.Random(f"{seed}-{epoch}-len")
    order = list(range(len(examples)))
    rng.shuffle(order)
    size = lambda i: len(examples[i].body) + len(examples[i].response)  # noqa: E731
    batches = []
    for start in range(0, len(order), window * batch_size):
        chunk = sorted(order[start : start + window * batch_size], key=size)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_micro(batch: list[int], parts: int) -> list[list[int]]:
    """Split one optimiser batch into `parts` micro-batches of near-equal size (round robin)."""
    return [batch[i::parts] for i in range(parts)]
