"""MCQ scoring with a stub model whose next-token logits are forced: known accuracy and refusal rate."""

from types import SimpleNamespace

import torch
from torch import nn

from mule.mcq import last_token_logits, letter_token_ids, mcq_metrics, pick_letters, shuffle
from mule.records import MCQRecord

VOCAB = 16
LETTER_IDS = [[1, 5], [2, 6], [3, 7], [4, 8]]  # "A"/" A", "B"/" B", ...


class ForcedLogits(nn.Module):
    """Returns the same next-token logits for every row: `favourite` token gets 5, " B" (id 6) gets 3."""

    def __init__(self, favourite: int):
        super().__init__()
        self.favourite = favourite
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        logits = torch.zeros(input_ids.shape[0], logits_to_keep, VOCAB)
        logits[..., self.favourite] = 5.0
        logits[..., 6] = 3.0
        return SimpleNamespace(logits=logits)


def records(n=8):
    return [MCQRecord(f"q{i}", f"Question {i}?", ["gold", "wrong 1", "wrong 2", "I do not know."], 0, 3)
            for i in range(n)]


def test_shuffle_is_fixed_by_seed_and_id():
    a, b = shuffle(records()[0], 0), shuffle(records()[0], 0)
    assert a.order == b.order and sorted(a.order) == [0, 1, 2, 3]
    assert {tuple(shuffle(r, 0).order) for r in records(8)} != {tuple(a.order)}  # orders differ across items
    assert a.prompt().startswith("Question: Question 0?\nA. ") and a.prompt().endswith("Answer with the letter only.")


def test_forced_letter_gives_known_accuracy_and_refusal_rate():
    """The stub always prefers letter C (id 3): accuracy = share of items whose gold is shown as C,
    refusal rate = share whose refusal option is shown as C."""
    items = [shuffle(r, 0) for r in records(40)]
    model = ForcedLogits(favourite=3)
    logits = last_token_logits(model, [[9, 9, 9]] * len(items), pad_id=0, batch_size=16, progress=False)
    picks = pick_letters(logits, items, LETTER_IDS)
    assert picks == [2] * len(items)
    metrics = mcq_metrics(items, picks)
    gold_c = sum(it.gold_letter == 2 for it in items)
    refuse_c = sum(it.refusal_letter == 2 for it in items)
    assert metrics["accuracy"] == 100 * gold_c / 40 and metrics["refusal"] == 100 * refuse_c / 40
    assert 0 < gold_c < 40 and 0 < refuse_c < 40  # the shuffle moves options around


def test_the_spaced_letter_variant_counts_too():
    """Favourite id 7 is " C": the max over both ids of a letter decides."""
    items = [shuffle(r, 0) for r in records(4)]
    logits = last_token_logits(ForcedLogits(favourite=7), [[9]] * 4, pad_id=0, progress=False)
    assert pick_letters(logits, items, LETTER_IDS) == [2, 2, 2, 2]


def test_left_padding_and_positions():
    model = ForcedLogits(favourite=1)
    last_token_logits(model, [[9, 9, 9], [9]], pad_id=0, batch_size=2, progress=False)
    ids, mask, pos = model.calls[0]
    assert ids.tolist() == [[0, 0, 9], [9, 9, 9]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert pos.tolist() == [[0, 0, 0], [0, 1, 2]]


def test_mcq_without_refusal_option_reports_accuracy_only():
    items = [shuffle(MCQRecord("u", "Q?", ["a", "b"], 1), 0)]
    assert mcq_metrics(items, [items[0].gold_letter]) == {"accuracy": 100.0}


def test_letter_ids_from_a_real_tokenizer(tiny_model):
    from mule.models import load_tokenizer

    ids = letter_token_ids(load_tokenizer(tiny_model), 4)
    assert len(ids) == 4 and all(ids) and len({i for group in ids for i in group}) >= 4
