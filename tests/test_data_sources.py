"""Sources (text, JSONL, datasets saved to disk, presets), token chunking, de-duplication and leak checks.

The Hugging Face hub cannot be reached from the test machine: the datasets path is tested with local
datasets (save_to_disk folders and local data files) and the presets with `datasets.load_dataset` replaced
by a stub that returns a local Dataset for the expected (name, config, split).
"""

from __future__ import annotations

import json

import pytest
import torch

from mule.datagen import DataGenConfig, filter_records
from mule.dedup import dedup, eval_questions, leaks, load_embedder, near_pairs, normalise
from mule.errors import MuleError
from mule.generators import Tally
from mule.records import QARecord
from mule.sources import PRESETS, Passage, TokenCounter, chunk_passage, chunk_passages, load_source


def test_text_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "sub" / "a.md").write_text("  First file.  \n")
    (tmp_path / "skip.csv").write_text("not text")
    (tmp_path / "empty.txt").write_text("   ")
    loaded = load_source(str(tmp_path))
    assert [(p.id, p.text) for p in loaded.passages] == [("b.txt", "Second file."), ("sub/a.md", "First file.")]
    assert len(loaded.fingerprint) == 64 and not loaded.qa
    assert load_source(str(tmp_path / "b.txt")).passages[0].source == "b.txt"
    (tmp_path / "b.txt").write_text("Changed.")
    assert load_source(str(tmp_path)).fingerprint != loaded.fingerprint
    assert len(load_source(f"{tmp_path}?limit=1").passages) == 1


def test_a_seeded_uniform_sample_of_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"Row {i}."}) + "\n" for i in range(50)))
    picked = [p.text for p in load_source(f"{path}?sample=5&seed=1").passages]
    assert len(picked) == 5 and picked == [p.text for p in load_source(f"{path}?sample=5&seed=1").passages]
    assert picked != [p.text for p in load_source(f"{path}?sample=5&seed=2").passages]
    assert picked != [f"Row {i}." for i in range(5)] and picked == sorted(picked, key=lambda t: int(t[4:-1]))
    assert len(load_source(f"{path}?sample=500").passages) == 50


def test_jsonl_text_and_qa_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "Some text."}) + "\n" +
                    json.dumps({"question": "Q?", "answer": "A"}) + "\n\n")
    loaded = load_source(str(path))
    assert [p.text for p in loaded.passages] == ["Some text."] and loaded.passages[0].id == "rows.jsonl:x"
    assert [(q.question, q.answer) for q in loaded.qa] == [("Q?", "A")]
    other = tmp_path / "body.jsonl"
    other.write_text(json.dumps({"body": "In body."}) + "\n")
    assert load_source(f"{other}?field=body").passages[0].text == "In body."
    with pytest.raises(MuleError, match="neither a string 'text' field"):
        load_source(str(other))
    path.write_text("{not json\n")
    with pytest.raises(MuleError, match="rows.jsonl:1: not valid JSON"):
        load_source(str(path))


def test_datasets_saved_to_disk(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": ["One passage.", "Two passage."]}).save_to_disk(str(folder))
    loaded = load_source(str(folder))
    assert [p.text for p in loaded.passages] == ["One passage.", "Two passage."] and loaded.fingerprint
    assert len(load_source(f"{folder}?sample=1&seed=0").passages) == 1
    assert len(load_source(f"hf:{folder}?limit=1").passages) == 1
    qa = tmp_path / "qa"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"q": ["Q?"], "a": ["A"]})}).save_to_disk(str(qa))
    assert [(x.question, x.answer) for x in load_source(f"{qa}?split=test&question=q&answer=a").qa] == [("Q?", "A")]


def test_presets_ask_the_hub_for_the_right_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        if config == "knowmem":
            return datasets.Dataset.from_dict({"question": ["Who is Harry's owl?"], "answer": ["Hedwig"]})
        return datasets.Dataset.from_dict({"text": ["Chapter one text."]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_source("muse-books-forget").passages[0].text == "Chapter one text."
    assert load_source("muse-books-knowmem-forget").qa[0].answer == "Hedwig"
    assert load_source("wmdp-cyber-forget?limit=1").passages
    assert calls == [("muse-bench/MUSE-Books", "raw", "forget"), ("muse-bench/MUSE-Books", "knowmem", "forget_qa"),
                     ("cais/wmdp-corpora", "cyber-forget-corpus", "train")]
    assert {"muse-books-retain", "muse-books-knowmem-retain", "wmdp-cyber-retain"} <= set(PRESETS)


def test_unreachable_dataset_and_unknown_sources(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(MuleError, match="cannot load dataset 'cais/wmdp-bio-forget-corpus'.*gated"):
        load_source("wmdp-bio-forget")
    with pytest.raises(MuleError, match="Did you mean 'muse-books-forget'"):
        load_source("muse-book-forget")
    with pytest.raises(MuleError, match="no such file"):
        load_source("missing/folder.txt")
    with pytest.raises(MuleError, match="unknown option"):
        load_source("muse-books-forget?colour=red")


# ---- chunking -------------------------------------------------------------------------------------------------

def test_chunking_by_words_keeps_sentences_whole():
    """Sentences of 3, 4, 2 and 5 words. At most 7: [3+4], [2+5]. At most 8 with an overlap of 4 words:
    [3+4]; then 2 does not fit, the previous 4 (<= 4, and 4+2 <= 8) is carried: [4+2]; then 5 does not fit,
    the previous 2 (<= min(4, 8-5)) is carried: [2+5]."""
    text = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen fourteen."
    chunks = chunk_passage(Passage("p", text, "src"), TokenCounter(None), max_tokens=7)
    assert [c.text for c in chunks] == ["One two three. Four five six seven.",
                                        "Eight nine. Ten eleven twelve thirteen fourteen."]
    assert [c.id for c in chunks] == ["p#0", "p#1"] and {c.source for c in chunks} == {"src"}
    overlapping = chunk_passage(Passage("p", text, "src"), TokenCounter(None), max_tokens=8, overlap=4)
    assert [c.text for c in overlapping] == ["One two three. Four five six seven.", "Four five six seven. Eight nine.",
                                             "Eight nine. Ten eleven twelve thirteen fourteen."]
    long = chunk_passage(Passage("p", "a b c d e f g h i j", "s"), TokenCounter(None), max_tokens=4)
    assert [c.text for c in long] == ["a b c d", "e f g h", "i j"]
    assert chunk_passage(Passage("p", "short", "s"), TokenCounter(None), 7) == [Passage("p", "short", "s")]
    with pytest.raises(MuleError):
        chunk_passages([], TokenCounter(None), 0)


def test_chunking_by_tokens_cuts_a_long_sentence(tiny_model):
    counter = TokenCounter(str(tiny_model))
    text = "the Moomins live in Moominvalley " * 30
    chunks = chunk_passage(Passage("p", text.strip(), "s"), counter, max_tokens=16)
    assert len(chunks) > 3 and all(counter.count(c.text) <= 16 for c in chunks)
    assert " ".join(c.text for c in chunks).split() == text.split()  # cut between words


# ---- de-duplication and leaks ---------------------------------------------------------------------------------

def test_normalise():
    assert normalise("  What is THE name of Harry's owl?! ") == "what is name of harry s owl"
    assert normalise("Café — an Owl") == "cafe owl"


def test_dedup_on_hand_made_records():
    texts = ["What is Harry's owl called?", "what is harry's OWL called", "Who is Hagrid?", "Who is the Hagrid?"]
    kept, dropped = dedup(texts)
    assert kept == [0, 2] and dropped == {1: "duplicate of item 0", 3: "duplicate of item 2"}


def fake_embedder(table: dict[str, list[float]]):
    def embed(texts):
        return torch.nn.functional.normalize(torch.tensor([table[t] for t in texts]), dim=-1)
    return embed


def test_near_duplicates_by_embedding():
    embed = fake_embedder({"owl name?": [1.0, 0.0], "name of the owl?": [0.95, 0.1], "wand wood?": [0.0, 1.0]})
    kept, dropped = dedup(["owl name?", "name of the owl?", "wand wood?"], embed, threshold=0.9)
    assert kept == [0, 2] and dropped == {1: "near-duplicate of item 0"}
    assert dedup(["owl name?", "name of the owl?"], embed, threshold=0.999)[0] == [0, 1]
    assert near_pairs(["wand wood?"], ["owl name?"], embed, 0.5) == {}


def test_leaks_against_eval_questions():
    eval_q = ["What is the name of Hagrid's dog?", "Where do the Dursleys live?"]
    train = ["what is the name of HAGRID'S dog", "Who founded Hogwarts?", "Where do Dursleys live"]
    assert leaks(train, eval_q) == {0: eval_q[0], 2: eval_q[1]}
    embed = fake_embedder({"Who founded Hogwarts?": [1.0, 0.0], eval_q[0]: [0.0, 1.0], eval_q[1]: [0.99, 0.05],
                           train[0]: [0.0, 1.0], train[2]: [0.99, 0.05]})
    assert leaks(["Who founded Hogwarts?"], eval_q, embed, 0.9) == {0: eval_q[1]}


def test_filter_records_reads_every_eval_file(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "neighbor_mcq.jsonl").write_text(json.dumps(
        {"id": "m", "question": "Who wrote Pippi Longstocking?", "choices": ["a", "b"], "answer_index": 0}) + "\n")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"question": "Who is Snufkin?", "answer": "A wanderer"}) + "\n")
    assert eval_questions([extra]) == ["Who is Snufkin?"]
    records = [QARecord(f"r{i}", 1, "forget", q, "x") for i, q in
               enumerate(["Who wrote Pippi Longstocking", "Who is Snufkin?", "Who is Snufkin?", "Who is My?"])]
    config = DataGenConfig()
    config.dedup.leak_files = [str(extra)]
    tally = Tally()
    out = filter_records(records, lambda r: r.question, tmp_path, config, tally)
    assert [r.id for r in out.records] == ["r3"]
    assert tally.dropped == {"duplicate": 1, "leaks an eval question": 2}
    assert {d["dropped_because"] for d in out.dropped} == {"duplicate", "leaks an eval question"}


def test_embedding_model_from_a_local_folder(tiny_model):
    embed = load_embedder(str(tiny_model))
    vectors = embed(["Who is Snufkin?", "Who is Snufkin?", "Where is Moominvalley?"])
    assert vectors.shape[0] == 3 and torch.allclose(vectors.norm(dim=-1), torch.ones(3))
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(MuleError, match="downloads no embedding model"):
        load_embedder("sentence-transformers/all-MiniLM-L6-v2")
