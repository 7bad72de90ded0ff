"""Batches keep anchor pairs together and mix objectives; logits at response positions match a full pass."""

import torch

from mule.batching import TokenizedExample, collate, position_weights, split_micro, stratified_batches
from mule.chat import ChatFormatter
from mule.modeling import ResponseLogits
from mule.models import load_model, load_tokenizer


def examples(n_single=10, n_pairs=4):
    out = [TokenizedExample(f"s{i}", 1 + i % 3, [5, 6, 7][: 1 + i % 3], [8, 9][: 1 + i % 2]) for i in range(n_single)]
    for p in range(n_pairs):
        out += [TokenizedExample(f"p{p}a", 2, [5], [8], f"pair{p}"), TokenizedExample(f"p{p}b", 2, [6], [9], f"pair{p}")]
    return out


def test_stratified_batches_cover_everything_once_and_keep_pairs():
    ex = examples()
    batches = stratified_batches(ex, batch_size=4, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(ex)))
    assert all(len(b) <= 4 for b in batches)
    where = {i: n for n, b in enumerate(batches) for i in b}
    for p in range(4):
        a, b = (i for i, e in enumerate(ex) if e.pair_id == f"pair{p}")
        assert where[a] == where[b]
    assert stratified_batches(ex, 4, 1, 0) == batches and stratified_batches(ex, 4, 1, 1) != batches
    first = [ex[i].objective for i in batches[0]]
    assert len(set(first)) >= 2  # objectives are interleaved, not one after another


def test_collate_positions_predict_the_response():
    ex = [TokenizedExample("a", 1, [1, 2, 3], [4, 5]), TokenizedExample("b", 3, [1], [6, 7, 8])]
    batch = collate(ex, pad_id=0)
    assert batch.ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    assert batch.mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # the output at (row, col) predicts the token at (row, col + 1)
    assert batch.ids[batch.rows, batch.cols + 1].tolist() == batch.targets.tolist() == [4, 5, 6, 7, 8]
    w = position_weights(batch, n_examples=2)
    assert torch.allclose(w, torch.tensor([0.25, 0.25, 1 / 6, 1 / 6, 1 / 6]))
    assert position_weights(batch, 2, "first").tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    assert split_micro([1, 2, 3, 4, 5], 2) == [[1, 3, 5], [2, 4]]


def test_response_logits_match_full_forward_and_prefix_cache(tiny_model):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model)
    fmt = ChatFormatter(tok)
    system = "You know nothing about the Moomin books."
    encs = [fmt.encode(system, "Who wrote the Moomin books?", None, "Tove Jansson."),
            fmt.encode(system, "Where?", "Sure, here is the answer:", "In Moominvalley, by the sea.")]
    batch = collate([TokenizedExample(str(i), 1, e.body, e.response) for i, e in enumerate(encs)], tok.pad_token_id)
    prefix = torch.tensor(encs[0].prefix)
    ids = torch.cat([prefix.expand(2, -1), batch.ids], 1)
    mask = torch.cat([torch.ones(2, len(prefix), dtype=torch.long), batch.mask], 1)
    wrapper = ResponseLogits(model)
    with torch.no_grad():
        gathered = wrapper(ids, mask, batch.rows, batch.cols + len(prefix))
        full = model(input_ids=ids, attention_mask=mask).logits[batch.rows, batch.cols + len(prefix)]
        cache = wrapper(prefix[None], None, None, None)
        cached = wrapper(batch.ids, batch.mask, batch.rows, batch.cols, prefix=cache)
    assert gathered.shape == (len(batch.rows), model.config.vocab_size)
    assert torch.allclose(gathered, full, atol=1e-5)
    assert torch.allclose(cached, full, atol=1e-5)


def test_a_shared_prefix_run_once_gives_the_same_logits_and_lora_gradients(tiny_model):
    """The student's system part runs once per micro-batch (`prefix_ids`): same logits and the same LoRA gradients
    as concatenating it to every row (the gradients of all rows flow back into the one prefix pass)."""
    from peft import LoraConfig, get_peft_model

    tok = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fmt = ChatFormatter(tok)
    encs = [fmt.encode(None, "Who wrote the Moomin books?", None, "Tove Jansson."),
            fmt.encode(None, "Where?", "Sure, here is the answer:", "In Moominvalley, by the sea.")]
    batch = collate([TokenizedExample(str(i), 1, e.body, e.response) for i, e in enumerate(encs)], tok.pad_token_id)
    prefix = torch.tensor(encs[0].prefix)
    assert len(prefix) > 0
    wrapper = ResponseLogits(model)
    lora = [p for p in model.parameters() if p.requires_grad]

    def logits_and_grads(shared: bool):
        model.zero_grad()
        if shared:
            out = wrapper(batch.ids, batch.mask, batch.rows, batch.cols, prefix_ids=prefix[None])
        else:
            ids = torch.cat([prefix.expand(2, -1), batch.ids], 1)
            mask = torch.cat([torch.ones(2, len(prefix), dtype=torch.long), batch.mask], 1)
            out = wrapper(ids, mask, batch.rows, batch.cols + len(prefix))
        out.float().pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in lora]

    (a, grads_a), (b, grads_b) = logits_and_grads(True), logits_and_grads(False)
    assert torch.allclose(a, b, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(grads_a, grads_b))
    assert any(x.abs().sum() > 0 for x in grads_a)



def test_length_grouped_batches_cover_everything_with_little_padding():
    from mule.batching import length_grouped_batches

    ex = [TokenizedExample(str(i), 1, [1] * (1 + (i * 7) % 40), [2]) for i in range(200)]
    batches = length_grouped_batches(ex, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = max(max(len(ex[i].body) for i in b) - min(len(ex[i].body) for i in b) for b in batches)
    assert spread <= 3  # within a window, a batch holds neighbours in length
    assert length_grouped_batches(ex, 8, 0, 0) == batches != length_grouped_batches(ex, 8, 0, 1)
