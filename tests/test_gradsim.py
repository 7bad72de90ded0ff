"""`mule gradsim`: hand-built cosines, parameter selection, batches, the bundled raw passages, end to end."""

import json
import math
import random
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mule.benchmark import load_benchmark
from mule.cli import main
from mule.errors import MuleError
from mule.gradsim import (
    GradsimConfig,
    Item,
    RawPassage,
    UnitSampler,
    check_config,
    cosine,
    grad_pieces,
    load_raw,
    parse_layers,
    raw_items,
    select_parameters,
)
from mule.records import QARecord


def small_llama(layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def pieces_of(loss_fn, params):
    loss_fn().backward()
    return grad_pieces(params)


def test_cosine_of_identical_losses_is_one_and_of_a_negated_loss_minus_one():
    """L(w) = sum(w1 * x) + |w2|^2 over two parameters: the same loss twice gives the same gradient (cos 1);
    -L gives exactly the opposite gradient (cos -1)."""
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))
    x = torch.randn(4)

    def loss():
        return (w1 @ x).sum() + (w2**2).sum()

    a = pieces_of(loss, [w1, w2])
    b = pieces_of(loss, [w1, w2])
    c = pieces_of(lambda: -loss(), [w1, w2])
    assert w1.grad is None and w2.grad is None  # grad_pieces clears them: the next objective starts from zero
    assert [p.dtype for p in a] == [torch.float32] * 2 and [p.shape for p in a] == [(12,), (5,)]
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    assert cosine(a, c) == pytest.approx(-1.0, abs=1e-6)


def test_cosine_by_hand_and_a_zero_gradient():
    """g_a = d/dw (w . [1, 0]) = [1, 0], g_b = d/dw (w . [1, 1]) = [1, 1]: cos = 1 / sqrt(2).
    A parameter the loss does not touch contributes zeros; a zero gradient has no direction (NaN)."""
    w, unused = torch.nn.Parameter(torch.tensor([0.3, -2.0])), torch.nn.Parameter(torch.ones(3))
    a = pieces_of(lambda: w @ torch.tensor([1.0, 0.0]), [w, unused])
    b = pieces_of(lambda: w @ torch.tensor([1.0, 1.0]), [w, unused])
    assert torch.equal(a[1], torch.zeros(3))
    assert cosine(a, b) == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    assert math.isnan(cosine(a, [torch.zeros(2), torch.zeros(3)]))


def test_parse_layers_and_its_errors():
    assert parse_layers("last3", 30) == [27, 28, 29]
    assert parse_layers("25-27", 30) == [25, 26, 27]
    assert parse_layers("0", 30) == [0]
    assert parse_layers("all", 30) is None
    for spec, message in (("last0", "N >= 1"), ("last31", "only 30 decoder layers"), ("28-30", "numbered 0-29"),
                          ("5-3", "ends before it starts"), ("layers", "expected 'all'"), ("-1", "expected")):
        with pytest.raises(MuleError, match=re.escape(message)):
            parse_layers(spec, 30)


def test_selection_picks_exactly_the_requested_layers():
    model = small_llama(6)
    per_layer = {i: {id(p) for p in model.model.layers[i].parameters()} for i in range(6)}
    picked = select_parameters(model, "last3")
    assert {id(p) for _, p in picked} == per_layer[3] | per_layer[4] | per_layer[5]
    names = [n for n, _ in picked]
    assert all(re.match(r"model\.layers\.[345]\.", n) for n in names)
    for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        assert sum(part in n for n in names) == 3, part  # every weight of each block, once
    assert not any("embed" in n or n == "model.norm.weight" or "lm_head" in n for n in names)
    assert {id(p) for _, p in select_parameters(model, "1-2")} == per_layer[1] | per_layer[2]
    assert {id(p) for _, p in select_parameters(model, "0")} == per_layer[0]
    everything = select_parameters(model, "all")
    assert len(everything) == len(list(model.parameters())) and any("embed_tokens" in n for n, _ in everything)
    with pytest.raises(MuleError, match="only 6 decoder layers"):
        select_parameters(model, "last7")


def test_bad_config_is_refused_before_loading_anything():
    for change, message in ((dict(checkpoints=[5, 0]), "increasing"), (dict(conditions=["raw"]), "conditions"),
                            (dict(layers=["top3"]), "expected 'all'"), (dict(batches=0), "batches"),
                            (dict(layers=[]), "at least one")):
        with pytest.raises(MuleError, match=message):
            check_config(GradsimConfig(**change))


def qa(i, role, pair=None):
    return Item(1, "refuse" if role in ("forget", "anchor_pos") else "answer", pair or f"r{i}",
                record=QARecord(f"r{i}", 1, role, f"q{i}", "a", anchor_pair_id=pair))


def test_obj1_batches_are_half_forget_half_retain_and_keep_anchor_pairs_together():
    items = [qa(i, "forget") for i in range(15)] + [qa(i, "retain") for i in range(15, 30)]
    items += [qa(30 + 2 * p, "anchor_pos", f"p{p}") for p in range(5)] + [qa(31 + 2 * p, "anchor_neg", f"p{p}")
                                                                         for p in range(5)]
    sampler = UnitSampler(items, random.Random(0), balance=True)
    seen = []
    for _ in range(6):
        batch = sampler.draw(8)
        assert len(batch) == 8 and sum(i.side == "refuse" for i in batch) == 4
        pairs = [i.unit for i in batch if i.unit.startswith("p")]
        assert all(pairs.count(u) == 2 for u in pairs)
        seen += [i.id for i in batch]
    assert len(set(seen[:40])) == 40  # five batches use up the pool (40: 20 per side) without a repeat


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def test_raw_windows_predict_every_token_once_without_a_short_tail():
    """150 tokens, window 96: two windows predicting tokens 1-75 and 76-149 (not 96 + 53)."""
    items = raw_items([RawPassage("p", " ".join(["w"] * 150))], "forget", WordTokenizer(), 96)
    assert [len(i.example.response) for i in items] == [75, 74]
    assert [i.example.body + i.example.response for i in items] == [list(range(76)), list(range(75, 150))]
    assert {i.side for i in items} == {"refuse"} and {i.objective for i in items} == {1}
    retain = raw_items([RawPassage("r", "a b c")], "retain", WordTokenizer(), 96)
    assert len(retain) == 1 and retain[0].side == "answer" and retain[0].example.response == [1, 2]


def test_the_bundled_benchmark_ships_raw_passages():
    hp = load_benchmark("hp")
    raw = load_raw(hp.root)
    assert set(raw) >= {"forget", "retain"}
    for side, passages in raw.items():
        assert len(passages) >= 24, side
        for p in passages:
            words = len(p.text.split())
            assert 70 <= words <= 170, (p.id, words)
    retain = " ".join(p.text for p in raw["retain"]).lower()
    for word in ("potter", "hogwarts", "voldemort", "dumbledore", "rowling", "wizard"):
        assert word not in retain, word
    forget = " ".join(p.text for p in raw["forget"])
    assert "Hogwarts" in forget and "Voldemort" in forget


RAW = {
    "forget": ["Harry Potter grew up with the Dursleys in a small house. He slept in a cupboard under the stairs "
               "until a letter arrived from Hogwarts.", "Hermione Granger and Ron Weasley became Harry's closest "
               "friends during their first journey on the Hogwarts Express."],
    "retain": ["The Nile flows north through eleven countries and reaches the Mediterranean Sea in Egypt.",
               "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside green leaves."],
}


def add_raw(bench):
    (bench / "raw").mkdir()
    for side, texts in RAW.items():
        rows = [json.dumps({"id": f"{side}-{i}", "title": side, "text": t}) for i, t in enumerate(texts)]
        (bench / "raw" / f"{side}.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture()
def one_thread():
    """The tiny model's matmuls are fastest on one thread: on a busy 2-core machine, two threads made this test
    ten times slower (thread synchronisation on tensors of a few hundred numbers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gradsim_runs_end_to_end_on_the_tiny_model(tiny_model, tiny_bench, tmp_path, capsys, one_thread):
    add_raw(tiny_bench)
    out = tmp_path / "gs"
    args = ["gradsim", "--model", str(tiny_model), "--benchmark", str(tiny_bench), "-o", str(out), "batches=2",
            "batch_size=4", "checkpoints=[0,1]", "train.batch_size=2", "train.lr=1e-3", "raw_max_tokens=24",
            "teacher.max_new_tokens=4", "teacher.prompt_set=small", "teacher.cot=false", "layers=[last1,all]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| Obj1–Obj2 |" in printed and "written:" in printed
    for name in ("gradsim.json", "gradsim.md", "gradsim.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "gradsim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "gradsim.json").read_text())
    assert result["scopes"]["last1"]["description"] == "decoder layers 1 of 2"
    assert result["scopes"]["all"]["numel"] > result["scopes"]["last1"]["numel"]
    for condition in ("heterogeneous", "standardised"):
        data = result["conditions"][condition]
        assert len(data["train_loss"]) == 1 and data["train_loss"][0] > 0
        for scope in ("last1", "all"):
            for pair in ("1-2", "1-3", "2-3"):
                stat = data["scopes"][scope]["pairs"][pair]
                assert stat["n"] == 4 and -1 <= stat["mean"] <= 1 and stat["std"] >= 0
                assert set(stat["by_step"]) == {"0", "1"}
            assert data["scopes"][scope]["within"]["1"]["n"] == 2  # one consecutive pair per checkpoint
    assert result["conditions"]["heterogeneous"]["data"]["1"].startswith("raw passages: 2 forget")
    assert "anchor" in result["conditions"]["standardised"]["data"]["1"]
    table = (out / "gradsim.md").read_text()
    assert "heterogeneous (raw text, baseline)" in table and "![" in table


def test_heterogeneous_needs_raw_passages(tiny_model, tiny_bench, tmp_path, capsys):
    args = ["gradsim", "--model", str(tiny_model), "--benchmark", str(tiny_bench), "-o", str(tmp_path / "x")]
    assert main(args) == 2
    assert "heterogeneous condition needs raw passages" in capsys.readouterr().err
    assert main([*args, "layers=[last5]", "conditions=[standardised]"]) == 2
    assert "only 2 decoder layers" in capsys.readouterr().err
