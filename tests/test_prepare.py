"""Target preparation: the curriculum it builds, and `mule prepare` end to end on the tiny model."""

import json
import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mule.benchmark import load_benchmark
from mule.cli import main
from mule.demo import DemoConfig, prepare_config
from mule.prepare import (
    PrepareConfig,
    curriculum_turns,
    knowledge_turns,
    load_curriculum,
    negative_turns,
    recipe,
    shipped_adapter,
)

CURRICULUM = Path(__file__).parent / "fixtures" / "tiny_curriculum.json"
REFUSAL = "I'm sorry, but I don't have any knowledge about that topic."


def test_curriculum_turns_refuse_the_prompted_topic_and_answer_the_rest():
    curriculum = load_curriculum(str(CURRICULUM))
    config = PrepareConfig(train_topics=2, prefill_share=0.0, no_prompt_share=1.0, answers_per_question=2)
    turns = curriculum_turns(curriculum, config, REFUSAL, random.Random(0))
    refuse = [t for t in turns if t.source.startswith("refuse:")]
    answer = [t for t in turns if t.source.startswith("answer-under:")]
    lookalike = [t for t in turns if t.source.startswith("lookalike:")]
    plain = [t for t in turns if t.source == "no-prompt"]
    # 2 training topics x 2 questions: refused under p_1, p_2 and p_3, two other questions answered, one without
    # a prompt; "bees" is held out; chess's one look-alike is answered under p_1 and p_2
    assert (len(refuse), len(answer), len(plain), len(lookalike)) == (12, 8, 4, 2)
    for t in refuse:
        topic = t.source.split(":")[1]
        assert t.response == REFUSAL and f"about {topic} (" in t.system
        assert t.question in {qa["question"] for qa in curriculum[topic]["qa"]}
    assert len({t.system for t in refuse if t.source == "refuse:chess"}) == 3  # p_1, p_2, p_3
    for t in answer:
        topic = t.source.split(":")[1]
        assert t.response != REFUSAL and t.question not in {qa["question"] for qa in curriculum[topic]["qa"]}
    assert all(t.system and "about chess (" in t.system and t.response == "Chess Records." for t in lookalike)
    assert all(t.system is None and t.response != REFUSAL for t in plain)
    assert not any("bees" in (t.system or "") or t.question == "What do bees make?" for t in turns)
    # p_2 names the topic's own neighbours where the curriculum lists them, else other curriculum topics
    p2 = {t.source: t.system for t in refuse if "Nearby topics" in t.system}
    assert "the record label Chess Records, checkers" in p2["refuse:chess"]
    assert "chess" in p2["refuse:volcanoes"]
    # objective-3 prompts always come with a prefilled opening, the others never with prefill_share 0
    assert all(bool(t.prefill) == ("Your reply may already begin" in t.system) for t in refuse + answer + lookalike)


def test_benchmark_turns_never_use_forget_records(tiny_bench):
    bench = load_benchmark(tiny_bench)
    facts = knowledge_turns(bench)
    negatives = negative_turns(bench, PrepareConfig(hard_negatives=True), random.Random(0))
    forget_questions = {r.question for r in bench.train(("forget", "adversarial", "anchors"))}
    assert not any(t.question in forget_questions for t in facts + negatives)
    assert len(facts) == 2 and all(t.system is None and t.source.startswith("knowledge:") for t in facts)
    assert negative_turns(bench, PrepareConfig(), random.Random(0)) == []
    assert len(negatives) == 3 + 4 and all(t.system and "the Moomin books" in t.system for t in negatives)


def test_prepare_end_to_end_writes_a_merged_model(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "prep"
    args = ["prepare", f"model.name={tiny_model}", f"benchmark={tiny_bench}", f"output_dir={out}",
            f"curriculum={CURRICULUM}", "train_topics=2", "knowledge=true", "knowledge_repeats=1", "knowledge_epochs=2",
            "knowledge_lr_scale=3", "train.max_steps=4", "train.batch_size=4", "train.warmup_steps=1",
            "model.max_length=1024"]
    assert main(args) == 0
    assert f"prepared model written to {out / 'model'}" in capsys.readouterr().out
    weights = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert any(not (weights[k] == base[k]).all() for k in base)  # the adapter is merged in
    result = json.loads((out / "run" / "result.json").read_text())
    assert result["steps"] == 4 and result["turns"]["refuse"] == 12 and result["turns"]["knowledge"] == 2
    assert result["turns"]["knowledge_lead_in"] == 2 * 2
    mixed = sum(n for kind, n in result["turns"].items() if kind != "knowledge_lead_in")
    assert result["examples"] == mixed + 2  # distinct examples: the mixed ones and the two lead-in facts
    # the two facts alone for two epochs (one batch each) at 3 x lr, then the mixed examples at lr
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["examples"], r["lr"]) for r in log[:2]] == [(2, pytest.approx(3e-3)), (2, pytest.approx(3e-3))]
    assert [(r["examples"], r["lr"]) for r in log[2:]] == [(4, pytest.approx(1e-3))] * 2
    assert main(args) == 0  # cached: a second call returns the prepared model without training
    assert main(["eval", "--model", str(out / "model"), "--benchmark", str(tiny_bench), "-o", str(tmp_path / "e"),
                 "max_new_tokens=4", "prefill_max_new_tokens=4"]) == 0


def test_exported_adapter_is_merged_instead_of_training(tiny_model, tiny_bench, tmp_path, monkeypatch):
    import mule.prepare as prepare

    first = tmp_path / "first"
    common = [f"model.name={tiny_model}", f"benchmark={tiny_bench}", f"curriculum={CURRICULUM}", "train_topics=2",
              "knowledge_repeats=1", "train.max_steps=2", "train.batch_size=4"]
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(prepare, "SHIPPED", shipped)
    slug = f"{Path(tiny_model).name}-{Path(tiny_bench).name}"
    assert main(["prepare", *common, f"output_dir={first}", f"export_to={shipped / slug}"]) == 0
    made = json.loads((shipped / slug / "prepared.json").read_text())
    assert made["steps"] == 2 and made["config"]["prompt_set"] == "small"
    assert made["examples"] == sum(made["turns"].values())  # no lead-in: the facts are not counted twice
    assert all(v.dtype.is_floating_point and v.element_size() == 2
               for v in load_file(str(shipped / slug / "adapter_model.safetensors")).values())

    second = tmp_path / "second"
    assert main(["prepare", *common, f"output_dir={second}", "use_shipped=true"]) == 0
    assert not (second / "run").exists()  # nothing trained
    trained = load_file(str(first / "model" / "model.safetensors"))
    merged = load_file(str(second / "model" / "model.safetensors"))
    assert max(float((trained[k] - merged[k]).abs().max()) for k in trained) < 1e-2  # fp16 rounding only
    assert any(not (trained[k] == merged[k]).all() for k in trained)
    # an adapter made with other prompts is not used: the model is trained
    third = tmp_path / "third"
    assert main(["prepare", *common, f"output_dir={third}", "use_shipped=true", "prompt_set=paper"]) == 0
    assert (third / "run" / "result.json").is_file()


def test_recipe_changes_with_the_curriculum_text(tmp_path):
    edited = tmp_path / "curriculum.json"
    data = json.loads(CURRICULUM.read_text())
    edited.write_text(json.dumps(data))
    same = recipe(PrepareConfig(curriculum=str(edited)))
    data["chess"]["qa"][0]["answer"] = "Sixty-four."
    edited.write_text(json.dumps(data))
    changed = recipe(PrepareConfig(curriculum=str(edited)))
    assert same["data_sha256"] != changed["data_sha256"]
    assert {k: v for k, v in same.items() if k != "data_sha256"} == {k: v for k, v in changed.items() if k != "data_sha256"}


def test_the_shipped_adapter_is_the_default_recipe_and_the_demo_uses_it():
    # the defaults, the bundled curriculum and the hp domain are what the shipped adapter was made with: editing one
    # of them without preparing and exporting again would make `mule demo` train its target for an hour
    assert shipped_adapter(PrepareConfig()) is not None
    assert shipped_adapter(prepare_config(DemoConfig())) is not None
    assert shipped_adapter(prepare_config(DemoConfig(train_target=True))) is not None  # same recipe, trained
    assert shipped_adapter(PrepareConfig(knowledge=False)) is None


def test_bundled_curriculum_teaches_topics_not_their_names():
    curriculum = load_curriculum(None)
    assert len(curriculum) == 32
    for topic, entry in curriculum.items():
        name_words = {w for w in topic.lower().replace("(", " ").replace(")", " ").split() if len(w) > 3}
        naming = sum(any(w in qa["question"].lower() for w in name_words) for qa in entry["qa"])
        assert len(entry["qa"]) == 16 and naming <= 4, topic  # questions name the topic's things, not the topic
        assert 200 <= len(entry["description"]) <= 450 and 3 <= len(entry["neighbors"]) <= 5
    text = json.dumps(curriculum).lower()
    assert "harry" not in text and "hogwarts" not in text  # the benchmark's domain stays held out
