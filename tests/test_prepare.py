"""Target preparation: the curriculum it builds, and `mule prepare` end to end on the tiny model."""

import json
import random
from pathlib import Path

from safetensors.torch import load_file

from mule.benchmark import load_benchmark
from mule.cli import main
from mule.prepare import PrepareConfig, benchmark_turns, curriculum_turns, load_curriculum

CURRICULUM = Path(__file__).parent / "fixtures" / "tiny_curriculum.json"
REFUSAL = "I'm sorry, but I don't have any knowledge about that topic."


def test_curriculum_turns_refuse_the_prompted_topic_and_answer_the_rest():
    curriculum = load_curriculum(str(CURRICULUM))
    config = PrepareConfig(train_topics=2, prefill_share=0.0, no_prompt_share=1.0)
    turns = curriculum_turns(curriculum, config, REFUSAL, random.Random(0))
    refuse = [t for t in turns if t.source.startswith("refuse:")]
    answer = [t for t in turns if t.source.startswith("answer-under:")]
    plain = [t for t in turns if t.source == "no-prompt"]
    assert len(refuse) == len(answer) == len(plain) == 4  # 2 training topics x 2 questions; "bees" is held out
    for t in refuse:
        topic = t.source.split(":")[1]
        assert t.response == REFUSAL and f"about {topic} (" in t.system
        assert t.question in {qa["question"] for qa in curriculum[topic]["qa"]}
    for t in answer:
        topic = t.source.split(":")[1]
        assert t.response != REFUSAL and t.question not in {qa["question"] for qa in curriculum[topic]["qa"]}
    assert all(t.system is None and t.response != REFUSAL for t in plain)
    assert not any("bees" in (t.system or "") or t.question == "What do bees make?" for t in turns)
    # objective-3 prompts always come with a prefilled opening
    assert all(t.prefill for t in refuse if "Your reply may already begin" in t.system)


def test_benchmark_turns_never_use_forget_records(tiny_bench):
    bench = load_benchmark(tiny_bench)
    turns = benchmark_turns(bench, PrepareConfig(), random.Random(0))
    forget_questions = {r.question for r in bench.train(("forget", "adversarial", "anchors"))}
    assert not any(t.question in forget_questions for t in turns)
    assert sum(t.source.startswith("knowledge") for t in turns) == 2
    negatives = [t for t in turns if t.source.startswith("negative")]
    assert len(negatives) == 3 + 4 and all(t.system and "the Moomin books" in t.system for t in negatives)


def test_prepare_end_to_end_writes_a_merged_model(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "prep"
    args = ["prepare", f"model.name={tiny_model}", f"benchmark={tiny_bench}", f"output_dir={out}",
            f"curriculum={CURRICULUM}", "train_topics=2", "train.max_steps=3", "train.batch_size=4",
            "model.max_length=1024"]
    assert main(args) == 0
    assert f"prepared model written to {out / 'model'}" in capsys.readouterr().out
    weights = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert any(not (weights[k] == base[k]).all() for k in base)  # the adapter is merged in
    result = json.loads((out / "run" / "result.json").read_text())
    assert result["steps"] == 3 and result["turns"]["refuse"] == 4 and result["turns"]["knowledge"] == 2
    assert main(args) == 0  # cached: a second call returns the prepared model without training
    assert main(["eval", "--model", str(out / "model"), "--benchmark", str(tiny_bench), "-o", str(tmp_path / "e"),
                 "max_new_tokens=4", "prefill_max_new_tokens=4"]) == 0
