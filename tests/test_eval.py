"""`mule eval`, `mule report` and `mule compare` end to end on the tiny random model."""

import json

import pytest

from mule.cli import main
from test_judge import FakeLLM

KEYS = {"forget", "forget_f1", "general", "general_f1", "neighbor_acc", "neighbor_refusal", "asr", "asr_rule",
        "utility"}


def run_eval(tiny_model, bench, out, *extra):
    return main(["eval", "--model", str(tiny_model), "--benchmark", str(bench), "--output", str(out),
                 "max_new_tokens=6", "prefill_max_new_tokens=6", *extra])


def metrics(out):
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("system", ["base", "oracle", "ensemble"])
def test_eval_writes_metrics_and_samples(tiny_model, tiny_bench, tmp_path, capsys, system):
    out = tmp_path / system
    assert run_eval(tiny_model, tiny_bench, out, "--system", system) == 0
    result = metrics(out)
    assert result["system"] == system and KEYS <= set(result["metrics"])
    assert all(0 <= result["metrics"][k] <= 100 for k in KEYS)
    assert result["counts"] == {"forget_qa": 2, "retain_qa": 2, "neighbor_mcq": 2, "prefill": 2, "utility_mcq": 2}
    for name in ("forget_qa", "retain_qa", "neighbor_mcq", "prefill", "utility_mcq"):
        rows = [json.loads(x) for x in (out / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 2
    prefill = [json.loads(x) for x in (out / "samples" / "prefill.jsonl").read_text().splitlines()]
    assert {"continuation", "leak_rule", "rouge_l_recall"} <= set(prefill[0])
    assert "metrics and samples written to" in capsys.readouterr().out


def test_existing_metrics_are_kept_unless_overwrite(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "e"
    assert run_eval(tiny_model, tiny_bench, out) == 0
    assert run_eval(tiny_model, tiny_bench, out) == 2
    assert "already holds metrics.json" in capsys.readouterr().err
    assert run_eval(tiny_model, tiny_bench, out, "overwrite=true") == 0


def test_llm_judge_through_a_loopback_server_and_its_cache(tiny_model, tiny_bench, tmp_path, monkeypatch):
    fake = FakeLLM()
    try:
        fake.reply = lambda body: "1"
        monkeypatch.setenv("MULE_LLM_API_KEY", "sk-test-SECRET123")
        args = ["judge=llm", f"llm.base_url={fake.url}", "llm.model=judge", "llm.backoff=0.01"]
        assert run_eval(tiny_model, tiny_bench, tmp_path / "j", *args) == 0
        m = metrics(tmp_path / "j")["metrics"]
        assert m["asr_judge"] == 100.0 and m["asr"] == 100.0 and m["judge_unparsed"] == 0
        sent = len(fake.requests)
        assert sent == 3  # the reachability probe + one verdict per prefill item
        assert run_eval(tiny_model, tiny_bench, tmp_path / "j", *args, "overwrite=true") == 0
        assert len(fake.requests) == sent  # every verdict came from the cache
        written = "".join(p.read_text() for p in (tmp_path / "j").rglob("*") if p.is_file())
        assert "SECRET123" not in written
    finally:
        fake.stop()


def test_unreachable_judge_fails_before_writing_metrics(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "u"
    assert run_eval(tiny_model, tiny_bench, out, "judge=llm", "llm.base_url=http://127.0.0.1:9/v1",
                    "llm.model=x", "llm.max_retries=1", "llm.backoff=0.01") == 2
    assert "http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_bad_mcq_names_file_and_line_and_writes_nothing(tiny_model, tiny_bench, tmp_path, capsys):
    path = tiny_bench / "eval" / "neighbor_mcq.jsonl"
    path.write_text(path.read_text() + json.dumps({"id": "bad", "question": "Q?", "choices": ["a", "b"],
                                                   "answer_index": 5}) + "\n")
    out = tmp_path / "b"
    assert run_eval(tiny_model, tiny_bench, out) == 2
    assert "neighbor_mcq.jsonl:3: answer_index 5 is out of range" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()


def test_compare_a_two_method_grid_then_rerun_skips_everything(tiny_model, tiny_bench, tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""# mule compare --config grid.yaml
benchmark: {tiny_bench}
model: {tiny_model}
output_dir: {tmp_path / 'cmp'}
systems: [base, oracle]
notes: [Target preparation was not used.]
unlearn_defaults:
  model: {{max_length: 1024}}
  teacher: {{max_new_tokens: 4}}
  train: {{max_steps: 2, batch_size: 4, lr: 1.0e-3}}
eval: {{max_new_tokens: 4, prefill_max_new_tokens: 4}}
methods:
  - name: bitopk
    unlearn: {{method: {{name: bitopk}}}}
  - name: duet
    unlearn: {{method: {{name: duet}}}}
""")
    assert main(["compare", "--config", str(grid)]) == 0
    out = tmp_path / "cmp"
    for name in ("report.md", "results.csv", "results.json", "radar.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "Target preparation was not used." in report and "bitopk" in report and "duet" in report
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 4 and csv_rows[1].startswith("base,")
    stamp = (out / "eval" / "bitopk" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", "--config", str(grid)]) == 0
    assert (out / "eval" / "bitopk" / "metrics.json").stat().st_mtime_ns == stamp

    assert main(["report", str(out / "eval" / "base"), str(out / "eval" / "bitopk"), "-o", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "radar.png").is_file()
