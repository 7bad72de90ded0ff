"""The bundled Harry Potter benchmark loads, validates, meets its sizes, and keeps train and eval apart."""

import json
import re
from pathlib import Path

import pytest

from mule.benchmark import EVAL_FILES, TRAIN_FILES, load_benchmark

MIN_TRAIN = {"forget": 150, "retain": 150, "neighbor": 150, "adversarial": 100}
MIN_EVAL = {"forget_qa": 100, "prefill": 100, "retain_qa": 100, "neighbor_mcq": 100, "utility_mcq": 100}


@pytest.fixture(scope="module")
def hp():
    return load_benchmark("hp")


def norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_every_file_validates_and_meets_its_size(hp):
    for name, minimum in MIN_TRAIN.items():
        assert len(hp.train((name,))) >= minimum, name
    for name, minimum in MIN_EVAL.items():
        assert len(hp.eval(name)) >= minimum, name
    assert set(EVAL_FILES) == set(MIN_EVAL) and set(TRAIN_FILES) == set(MIN_TRAIN) | {"anchors"}
    assert "Harry Potter" in hp.domain.name and len(hp.domain.neighbors) >= 5


def test_anchor_pairs(hp):
    anchors = hp.train(("anchors",))
    pairs = {}
    for r in anchors:
        pairs.setdefault(r.anchor_pair_id, []).append(r)
    for objective in (1, 2, 3):
        assert sum(1 for p in pairs.values() if p[0].objective == objective) >= 50
    for members in pairs.values():
        assert sorted(r.role for r in members) == ["anchor_neg", "anchor_pos"]
        assert len({r.objective for r in members}) == 1
        if members[0].objective == 3:
            assert members[0].prefill and members[0].prefill == members[1].prefill


def test_neighbor_mcq_has_a_refusal_option(hp):
    for r in hp.eval("neighbor_mcq"):
        assert r.refusal_index is not None and r.choices[r.refusal_index] == "I do not know."


def test_train_and_eval_are_disjoint(hp):
    """No question is shared between any two files, and no eval answer is a train answer verbatim."""
    questions: dict[str, str] = {}
    for name in TRAIN_FILES:
        for r in hp.train((name,)):
            assert questions.setdefault(norm(r.question), name) == name or name == "anchors", r.id
    train_answers = {norm(r.answer) for r in hp.train()}
    for name in EVAL_FILES:
        for r in hp.eval(name):
            assert norm(r.question) not in questions, (name, r.id)
            questions[norm(r.question)] = name
            if hasattr(r, "answer") and isinstance(r.answer, str):
                assert norm(r.answer) not in train_answers, (name, r.id)


def test_preparation_facts_never_copy_an_eval_question(hp):
    eval_questions = {norm(r.question) for name in EVAL_FILES for r in hp.eval(name)}
    for path in sorted(Path(hp.root, "prepare").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert rows
        for row in rows:
            assert norm(row["question"]) not in eval_questions, row["id"]
