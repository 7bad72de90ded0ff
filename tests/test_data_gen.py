"""`mule data` through a real chat-completions server on loopback (test_judge.FakeLLM): retries on 429/5xx,
the JSON checks (re-ask, then skip and count), the disk cache (a rerun sends nothing; an interrupted or killed
run resumes), and the key never being written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mule.cli import main
from mule.datagen import QA_EXAMPLES, DataGenConfig, example_turn, qa_list, qa_problem, run_qa
from mule.errors import MuleError
from mule.generators import GeneratorConfig, Tally, ask_json, make_generator, parse_json_reply
from mule.records import MCQRecord, QARecord, read_jsonl
from test_judge import FakeLLM

KEY = "sk-test-SECRET123"
FACT = re.compile(r"The (\w+) of (\w+) is (\w+)\.")
TEXTS = {
    "a.txt": "The capital of Zorbia is Quellon. The river of Zorbia is Mert. The capital of Zorbia is Quellon.",
    "b.txt": "GARBLE once. The king of Arnia is Tolbo.",
    "c.md": "ALWAYSBAD here. The queen of Arnia is Sela.",
    "d.txt": "The mountain of Velm is Krast. The bridge of Velm is Orro. The lake of Velm is Dunn.",
    "e.txt": "The horse of Velm is Bruin.",
}


def shown_example(body: dict) -> bool:
    """Whether the request opens with the worked example of `data qa` (a user/assistant turn)."""
    return (any(e["passage"] in body["messages"][1]["content"] for e in QA_EXAMPLES)
            and body["messages"][2]["role"] == "assistant")


def user_text(body: dict) -> str:
    """The request's own prompt: its first user message after the worked example, if one was shown."""
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    return users[1] if shown_example(body) else users[0]


def scripted(body: dict) -> str | int:
    """A deterministic generator: QA from 'The X of Y is Z.' sentences, concepts, verdicts, anchors, distractors."""
    user = user_text(body)
    reasked = len(body["messages"]) > (4 if shown_example(body) else 2)
    if "Passage:" in user:
        text = user.split("<<<")[1].split(">>>")[0]
        if "COPYCAT" in text:
            return json.dumps({"question": "In which city was Marie Curie born?", "answer": "Warsaw"})
        if "INVENTS" in text:
            return json.dumps({"qa": [{"question": "What is the colour of Zorbia's flag?", "answer": "Green"},
                                      {"question": "What is the tree of Ull called?", "answer": "Ash wood"}]})
        if "ALWAYSBAD" in text:
            return "Sorry, I cannot do that."
        if "GARBLE" in text and not reasked:
            return 'Here you go: {"qa": [ {"question": '  # cut off: malformed
        if "FAIL500" in text:
            return 500
        qa = [{"question": f"What is the {a} of {b}?", "answer": c} for a, b, c in FACT.findall(text)]
        if "mountain" in text:
            qa.append({"question": "What does the passage say about it?", "answer": "Krast"})  # rejected by checks
        return "```json\n" + json.dumps({"qa": qa}) + "\n```"
    if user.startswith("The domain to forget") and "List " in user:
        topic = re.search(r'area "([^"]+)"', user).group(1)
        return json.dumps({"concepts": [{"concept": f"{topic} basics", "reason": "general knowledge"},
                                        {"concept": f"Moomin {topic}", "reason": "sounds close"},
                                        {"concept": f"{topic} history", "reason": "documented outside"}]})
    if "Concept:" in user:
        concept = user.split("Concept: ")[1].split("\n")[0]
        return json.dumps({"inside": "Moomin" in concept, "reason": "test"})
    if "test well-known facts about" in user:
        concept = user.split("about: ")[1].split(".\n")[0]
        return json.dumps({"qa": [{"question": f"What is one fact about {concept.title()}?",
                                   "answer": "Something notable."}]})
    if "belongs to the domain" in user or "inside the domain" in user or "An attacker opens" in user:
        quoted = re.search(r'"([^"]+\?)"', user).group(1).rstrip("?")
        if "colour" not in quoted:  # else the negative names the domain ("Moomins") and must be dropped
            quoted = quoted.replace("Moomin", "Viking")
        return json.dumps({"question": f"Which real thing is like {quoted}?", "answer": "An example."})
    if "wrong answers" in user:
        gold = user.split("Correct answer: ")[1].split("\n")[0]
        if "bad" in gold:
            return json.dumps({"distractors": [gold]})  # the gold itself: no usable distractor
        return json.dumps({"distractors": [f"Not {gold}", f"Moomin {gold}"]})
    return "?"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("MULE_LLM_API_KEY", "MULE_LLM_BASE_URL", "MULE_LLM_MODEL", "http_proxy", "HTTP_PROXY",
                 "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def fake():
    server = FakeLLM()
    server.reply = scripted
    yield server
    server.stop()


@pytest.fixture()
def texts(tmp_path) -> Path:
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text)
    return folder


def gen_args(fake: FakeLLM, *extra: str) -> list[str]:
    return [f"generator.base_url={fake.url}", "generator.model=gen", "generator.backoff=0.01",
            "generator.max_retries=3", "generator.concurrency=2", "progress=false", *extra]


def data_qa(fake, texts, bench, *extra) -> int:
    return main(["data", "qa", "-o", str(bench), "--source", str(texts), *gen_args(fake, *extra),
                 "domain.name=Zorbia lore", "domain.description=a made-up land", "domain.short_name=Zorbia"])


def test_data_qa_validates_dedups_and_counts(fake, texts, tmp_path, capsys):
    bench = tmp_path / "bench"
    (bench / "eval").mkdir(parents=True)
    (bench / "eval" / "forget_qa.jsonl").write_text(json.dumps(
        {"id": "e1", "objective": 1, "role": "forget", "question": "what is the LAKE of Velm", "answer": "Dunn"}) + "\n")
    fake.statuses = [429, 429, 503]  # rate limits and a server error, retried
    assert data_qa(fake, texts, bench) == 0
    records = read_jsonl(bench / "train" / "forget.jsonl", QARecord)
    questions = {r.question for r in records}
    assert questions == {"What is the capital of Zorbia?", "What is the river of Zorbia?", "What is the king of Arnia?",
                         "What is the mountain of Velm?", "What is the bridge of Velm?", "What is the horse of Velm?"}
    assert all(r.objective == 1 and r.role == "forget" for r in records)
    summary = json.loads(capsys.readouterr().out)
    counts = summary["counts"]
    assert counts["requests"] == 5 and counts["reasked"] == 1 + 2  # GARBLE once; ALWAYSBAD twice, then skipped
    assert counts["skipped_bad_json"] == 1 and counts["failed"] == 0 and counts["kept"] == 6
    assert counts["dropped"] == {"duplicate": 1, "leaks an eval question": 1, "refers to the source text": 1}
    dropped = [json.loads(x) for x in (bench / "data" / "qa_dropped.jsonl").read_text().splitlines()]
    assert {d["dropped_because"] for d in dropped} == {"duplicate", "leaks an eval question", "refers to the source text"}
    manifest = json.loads((bench / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert manifest["count"] == 6 and manifest["generator"]["model"] == "gen"
    assert manifest["prompts"]["qa"]["version"] == "qa-v2" and len(manifest["sources"][0]["fingerprint"]) == 64
    assert manifest["dedup"]["leak_checked_against"] == ["eval/forget_qa.jsonl"]
    assert (bench / "benchmark.yaml").is_file()


def test_a_request_failing_for_good_is_counted(fake, texts, tmp_path, capsys):
    (texts / "f.txt").write_text("FAIL500 now. The tree of Ull is Ash.")
    assert data_qa(fake, texts, tmp_path / "b", "generator.max_retries=1") == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["failed"] == 1 and counts["kept"] == 7  # no eval file here: nothing leaks


def test_rerun_sends_nothing_and_the_key_is_never_written(fake, texts, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("MULE_LLM_API_KEY", KEY)
    bench = tmp_path / "bench"
    assert data_qa(fake, texts, bench) == 0
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
    sent, first = len(fake.requests), (bench / "train" / "forget.jsonl").read_text()
    capsys.readouterr()
    assert data_qa(fake, texts, bench) == 0
    assert len(fake.requests) == sent  # every answer (re-asks included) came from the cache
    assert (bench / "train" / "forget.jsonl").read_text() == first
    assert json.loads(capsys.readouterr().out)["cached_answers_used"] == sent
    written = "".join(p.read_text() for p in bench.rglob("*") if p.is_file())
    assert KEY not in written and KEY not in caplog.text


def test_an_interrupted_run_resumes_from_the_cache(fake, texts, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert data_qa(fake, texts, whole, "generator.concurrency=1") == 0
    total = len(fake.requests)
    fake.requests.clear()
    answered = []

    def dies_after_three(body):
        answered.append(1)
        return 401 if len(answered) == 4 else scripted(body)  # a fatal error stops the run mid-way

    fake.reply = dies_after_three
    bench = tmp_path / "bench"
    assert data_qa(fake, texts, bench, "generator.concurrency=1") == 2
    assert "HTTP 401" in capsys.readouterr().err
    cached = len((bench / "cache" / "generator.jsonl").read_text().splitlines())
    assert cached in (3, 4)  # the pool's one worker may have started the next request before the run stopped
    assert not (bench / "train" / "forget.jsonl").exists()
    fake.reply, fake.requests[:] = scripted, []
    assert data_qa(fake, texts, bench, "generator.concurrency=1") == 0
    assert len(fake.requests) == total - cached  # only what the first run had not got
    assert (bench / "train" / "forget.jsonl").read_text() == (whole / "train" / "forget.jsonl").read_text()


def test_a_killed_process_resumes(fake, texts, tmp_path):
    """SIGKILL a real `mule data qa` mid-run; the rerun asks only what was not answered. The fake server answers two
    requests and holds the third until the process is dead, so the cut falls at the same place however slow the
    machine is."""
    answered, release = [], threading.Event()

    def two_then_hold(body):
        answered.append(1)
        if len(answered) > 2:
            release.wait(300)
        return scripted(body)

    fake.reply = two_then_hold
    bench = tmp_path / "bench"
    cache = bench / "cache" / "generator.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "mule.cli", "data", "qa", "-o", str(bench), "--source", str(texts),
           *gen_args(fake, "generator.concurrency=1")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and len(answered) < 3 and proc.poll() is None:
            time.sleep(0.05)
        assert len(answered) == 3, "the process ended or stalled before its third request"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        release.set()
        if proc.poll() is None:
            proc.kill()
    cached = len(cache.read_text().splitlines())
    assert cached == 2 and not (bench / "train" / "forget.jsonl").exists()
    fake.reply, before = scripted, len(fake.requests)
    assert main(["data", "qa", "-o", str(bench), "--source", str(texts), *gen_args(fake)]) == 0
    assert len(fake.requests) - before == 8 - cached  # 5 chunks + 3 re-asks in all
    assert len(read_jsonl(bench / "train" / "forget.jsonl", QARecord)) == 7


def test_one_pair_per_passage_is_asked_as_one_object(fake, texts, tmp_path, capsys):
    assert data_qa(fake, texts, tmp_path / "b", "qa.per_passage=1") == 0
    assert 'in this form: {"question": "...", "answer": "..."}' in user_text(fake.requests[0]["body"])
    counts = json.loads(capsys.readouterr().out)["counts"]
    # the server still answers with lists: a.txt's 2nd and 3rd pairs and d.txt's 2nd to 4th are beyond the one asked
    assert counts["kept"] == 4 and counts["dropped"]["more than the 1 pairs asked for"] == 4


def test_the_worked_example_goes_first_as_a_prior_turn(fake, texts, tmp_path, capsys):
    bench = tmp_path / "b"
    assert data_qa(fake, texts, bench, "qa.per_passage=1") == 0
    messages = fake.requests[0]["body"]["messages"]  # over HTTP, as any endpoint (or mule.serve) gets it
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert QA_EXAMPLES[0]["passage"] in messages[1]["content"] and "Passage:" in messages[3]["content"]
    assert messages[1]["content"].split("Passage:")[0] == messages[3]["content"].split("Passage:")[0]  # same prompt
    assert json.loads(messages[2]["content"]) == {"question": "In which city was Marie Curie born?",
                                                  "answer": "Warsaw"}  # the one-object form asked for
    assert json.loads(example_turn(0, 3)[1])["qa"][2] == {"question": "Where did Marie Curie study physics?",
                                                          "answer": "The Sorbonne"}
    manifest = json.loads((bench / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert manifest["prompts"]["qa_examples"]["version"] == "qa-examples-v1"
    assert manifest["prompts"]["qa_examples"]["examples"] == 1
    capsys.readouterr()
    sent = len(fake.requests)
    assert data_qa(fake, texts, tmp_path / "c", "qa.per_passage=1", "qa.example=false") == 0
    assert [m["role"] for m in fake.requests[sent]["body"]["messages"]] == ["system", "user"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert "qa_examples" not in manifest["prompts"]
    # the example only changes the request: the same replies give the same records
    assert (tmp_path / "c" / "train" / "forget.jsonl").read_text() == (bench / "train" / "forget.jsonl").read_text()


def test_answers_not_in_the_passage_and_copied_examples_are_dropped(fake, texts, tmp_path, capsys):
    (texts / "g.txt").write_text("INVENTS things. The tree of Ull is Ash.")
    (texts / "h.txt").write_text("COPYCAT writes. The bell of Ull is Dong.")
    bench = tmp_path / "b"
    assert data_qa(fake, texts, bench) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["kept"] == 7  # the 7 pairs of the other texts
    assert counts["dropped"]["answer not in the passage"] == 2 and counts["dropped"]["copies the worked example"] == 1
    dropped = [json.loads(x) for x in (bench / "data" / "qa_dropped.jsonl").read_text().splitlines()]
    assert {(d["answer"], d["dropped_because"]) for d in dropped if d["source"] in ("g.txt", "h.txt")} == {
        ("Green", "answer not in the passage"), ("Ash wood", "answer not in the passage"),
        ("Warsaw", "copies the worked example")}
    manifest = json.loads((bench / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert manifest["checks"] == {"answer_in_passage": True}
    assert data_qa(fake, texts, tmp_path / "c", "qa.answer_in_passage=false") == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["kept"] == 9 and "answer not in the passage" not in counts["dropped"]
    assert counts["dropped"]["copies the worked example"] == 1  # copied even when the check of answers is off


def test_several_requests_per_passage_each_show_another_example(fake, texts, tmp_path, capsys):
    def by_example(body):  # like a greedy small model: what it writes depends on the example it was shown
        text = user_text(body).split("<<<")[1].split(">>>")[0]
        shown = next(j for j, e in enumerate(QA_EXAMPLES) if e["passage"] in body["messages"][1]["content"])
        facts = FACT.findall(text)
        if not facts:
            return "no idea"
        a, b, c = facts[min(shown, len(facts) - 1)]
        return json.dumps({"question": f"What is the {a} of {b}?", "answer": c})

    fake.reply = by_example
    bench = tmp_path / "b"
    assert data_qa(fake, texts, bench, "qa.per_passage=1", "qa.requests_per_passage=3", "generator.json_retries=0") == 0
    firsts = [r["body"]["messages"] for r in fake.requests]
    assert len(firsts) == 5 * 3  # 5 chunks, 3 requests each, no re-asks
    d_txt = [m for m in firsts if "The mountain of Velm" in m[3]["content"]]
    assert sorted(QA_EXAMPLES.index(next(e for e in QA_EXAMPLES if e["passage"] in m[1]["content"]))
                  for m in d_txt) == [0, 1, 2]
    counts = json.loads(capsys.readouterr().out)["counts"]
    # a.txt: capital, river, capital (a duplicate); b, c, e: one fact each, asked 3 times (2 duplicates each);
    # d.txt: mountain, bridge, lake: three pairs from one passage
    assert counts["requests"] == 15 and counts["kept"] == 2 + 1 + 1 + 3 + 1
    assert counts["dropped"] == {"duplicate": 1 + 2 + 2 + 2} and counts["skipped_bad_json"] == 0
    records = read_jsonl(bench / "train" / "forget.jsonl", QARecord)
    assert sorted(r.answer for r in records if r.source == "d.txt") == ["Dunn", "Krast", "Orro"]
    manifest = json.loads((bench / "manifest.json").read_text())["files"]["train/forget.jsonl"]
    assert manifest["prompts"]["qa_examples"]["examples"] == 3
    with pytest.raises(MuleError, match="requests_per_passage"):
        config = DataGenConfig(benchmark=str(tmp_path / "x"), progress=False)
        config.qa.sources, config.qa.example, config.qa.requests_per_passage = [str(texts)], False, 2
        run_qa(config)


def test_refuses_to_replace_a_file_mule_did_not_write(fake, texts, tmp_path, capsys):
    bench = tmp_path / "bench"
    (bench / "train").mkdir(parents=True)
    (bench / "train" / "forget.jsonl").write_text("hand-made\n")
    assert data_qa(fake, texts, bench) == 2
    assert "was not written by mule" in capsys.readouterr().err and not fake.requests
    assert data_qa(fake, texts, bench, "overwrite=true") == 0


def test_eval_sources_are_copied_and_leak_checked(fake, texts, tmp_path):
    qa = tmp_path / "knowmem.jsonl"
    qa.write_text(json.dumps({"question": "What is the river of Zorbia?", "answer": "Mert"}) + "\n")
    bench = tmp_path / "bench"
    assert data_qa(fake, texts, bench, f"qa.eval_sources={{forget_qa: {qa}}}") == 0
    (held,) = read_jsonl(bench / "eval" / "forget_qa.jsonl", QARecord)
    assert held.question == "What is the river of Zorbia?"
    assert held.question not in {r.question for r in read_jsonl(bench / "train" / "forget.jsonl", QARecord)}


def test_neighbors_anchors_mcq(fake, tiny_bench, capsys):
    args = gen_args(fake, "neighbors.per_topic=3", "neighbors.eval_fraction=0.5", "anchors.per_objective=2",
                    "overwrite=true")  # the fixture's hand-made files are replaced
    assert main(["data", "neighbors", "-o", str(tiny_bench), *args]) == 0
    concepts = [json.loads(x) for x in (tiny_bench / "data" / "neighbor_concepts.jsonl").read_text().splitlines()]
    assert len(concepts) == 6 and not any("Moomin" in c["concept"] for c in concepts)  # filtered as inside
    assert all(c["reason"] for c in concepts) and {c["split"] for c in concepts} == {"train", "eval"}
    train = read_jsonl(tiny_bench / "train" / "neighbor.jsonl", QARecord)
    held = read_jsonl(tiny_bench / "data" / "neighbor_eval_qa.jsonl", QARecord)
    assert len(train) == len(held) == 3 and not {r.source for r in train} & {r.source for r in held}
    assert all(r.objective == 2 and r.role == "neighbor" for r in train)

    capsys.readouterr()
    assert main(["data", "anchors", "-o", str(tiny_bench), *args]) == 0
    anchors = read_jsonl(tiny_bench / "train" / "anchors.jsonl", QARecord)
    pairs = {1: 2, 2: 2, 3: 1}  # Obj3's second negative named the domain: that pair is dropped
    assert [(r.objective, r.role) for r in anchors] == [(k, role) for k, n in pairs.items() for _ in range(n)
                                                         for role in ("anchor_pos", "anchor_neg")]
    assert json.loads(capsys.readouterr().out)["counts"]["dropped"] == {"names the forget domain": 1}
    for pos, neg in zip(anchors[::2], anchors[1::2]):
        assert pos.anchor_pair_id == neg.anchor_pair_id and pos.prefill == neg.prefill
        assert (pos.prefill is not None) == (pos.objective == 3)
    forget = {r.question for r in read_jsonl(tiny_bench / "train" / "forget.jsonl", QARecord)}
    assert all(r.question in forget for r in anchors if r.role == "anchor_pos" and r.objective < 3)

    assert main(["data", "mcq", "-o", str(tiny_bench), *args]) == 0
    mcqs = read_jsonl(tiny_bench / "eval" / "neighbor_mcq.jsonl", MCQRecord)
    assert len(mcqs) == 3
    for m, r in zip(mcqs, held):
        assert m.question == r.question and m.choices[m.answer_index] == r.answer
        assert m.refusal_index == 3 and m.choices[3] == "I do not know." and len(set(m.choices)) == 4
    files = json.loads((tiny_bench / "manifest.json").read_text())["files"]
    assert {"train/neighbor.jsonl", "train/anchors.jsonl", "eval/neighbor_mcq.jsonl"} <= set(files)
    assert files["eval/neighbor_mcq.jsonl"]["prompts"]["mcq"]["version"] == "mcq-v1"


def test_mcq_without_usable_distractors_is_dropped_and_counted(fake, tiny_bench, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": f"q{i}", "objective": 2, "role": "neighbor", "question": f"Q number {i}?",
                                      "answer": a}) + "\n" for i, a in enumerate(["good", "bad"])))
    assert main(["data", "mcq", "-o", str(tiny_bench), f"mcq.input={qa}", "overwrite=true", *gen_args(fake)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == {"eval/neighbor_mcq.jsonl": 1}
    assert out["counts"]["dropped"] == {"fewer than 2 usable distractors": 1}


# ---- units: JSON parsing and the checks ------------------------------------------------------------------------

def test_parse_json_reply():
    assert parse_json_reply('{"a": 1}') == {"a": 1}
    assert parse_json_reply('Sure!\n```json\n{"a": [1, 2]}\n```\nDone.') == {"a": [1, 2]}
    assert parse_json_reply('Here: [{"q": "x"}] and more text') == [{"q": "x"}]
    with pytest.raises(ValueError, match="malformed"):  # nothing is salvaged from inside a broken value
        parse_json_reply('{"qa": [{"question": "q", "answer": "a"}}, {"question": "r"}]}')
    with pytest.raises(ValueError, match="no JSON"):
        parse_json_reply("plain words")
    with pytest.raises(ValueError, match="malformed"):
        parse_json_reply('{"qa": [ {"question": ')


def test_qa_list_and_qa_problem():
    assert qa_list({"qa": [{"question": "q", "answer": "a"}]}) == [{"question": "q", "answer": "a"}]
    assert qa_list({"pairs": [{"question": "q"}]}) == [{"question": "q"}]
    assert qa_list({"question": "q", "answer": "a"}) == [{"question": "q", "answer": "a"}]
    for bad in ({"a": 1}, "text", [1, 2]):
        with pytest.raises(ValueError):
            qa_list(bad)
    ok = "Who wrote the novel Moominsummer Madness?"
    assert qa_problem(ok, "Tove Jansson", 30) is None
    assert qa_problem("Who wrote it", "Tove", 30) == "not a question"
    assert qa_problem("Who?", "Tove", 30) == "question too short"
    assert qa_problem(ok, "word " * 31, 30) == "answer longer than 30 words"
    assert qa_problem("What does the passage say about the boat?", "A lot", 30) == "refers to the source text"
    assert qa_problem("What did she find in the cave?", "A hat", 30) == "pronoun without a named entity"
    assert qa_problem("What did she find in Moominvalley?", "A hat", 30) is None
    assert qa_problem("Is the capital of Finland Helsinki?", "Helsinki", 30) == "answer given in the question"
    assert qa_problem(None, "x", 30) == "empty or non-string question/answer"


def test_ask_json_reasks_then_skips(fake, tmp_path):
    replies = {"1": ['{"v": 1}'], "2": ["nope", '{"v": 2}'], "3": ["nope", "still no", "never"]}

    def reply(body):
        return replies[body["messages"][0]["content"]][len(body["messages"]) // 2]

    fake.reply = reply
    gen = make_generator(GeneratorConfig(base_url=fake.url, model="m", backoff=0.01), tmp_path / "c.jsonl")
    tally = Tally()
    chats = [[{"role": "user", "content": k}] for k in ("1", "2", "3")]

    def check(obj, i):
        if "v" not in obj:
            raise ValueError("no v")
        return obj["v"]

    assert ask_json(gen, chats, check, 2, tally, "t", progress=False) == [1, 2, None]
    assert (tally.reasked, tally.skipped, tally.failed) == (3, 1, 0)
    reask = fake.requests[3]["body"]["messages"]  # the bad reply and the problem go back to the model
    assert reask[1] == {"role": "assistant", "content": "nope"} and "no JSON object" in reask[2]["content"]


def test_missing_endpoint_settings_fail_before_any_work(texts, tmp_path):
    config = DataGenConfig(benchmark=str(tmp_path / "b"), progress=False)
    config.qa.sources = [str(texts)]
    with pytest.raises(MuleError, match="MULE_LLM_BASE_URL"):
        run_qa(config)
