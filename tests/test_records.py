"""Record and benchmark validation: every error names the file and the line."""

import json

import pytest

from mule.benchmark import load_benchmark
from mule.errors import MuleError
from mule.records import MCQRecord, PrefillRecord, QARecord, read_jsonl, write_jsonl


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


QA = {"id": "a", "objective": 1, "role": "forget", "question": "Q?", "answer": "A."}


def test_reads_valid_records(tmp_path):
    path = write(tmp_path / "f.jsonl", [QA, {**QA, "id": "b", "role": "retain", "source": "x"}])
    records = read_jsonl(path, QARecord)
    assert [r.id for r in records] == ["a", "b"] and records[1].source == "x"


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in QA.items() if k != "answer"}, "missing required field(s): answer"),
    ({**QA, "objective": 4}, "objective must be 1, 2 or 3"),
    ({**QA, "role": "forgot"}, "role must be one of"),
    ({**QA, "objective": "1"}, "field 'objective' must be int"),
    ({**QA, "role": "adversarial", "objective": 3}, "needs a non-empty 'prefill'"),
    ({**QA, "role": "anchor_pos"}, "needs 'anchor_pair_id'"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_errors_name_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [QA, row])
    with pytest.raises(MuleError) as err:
        read_jsonl(path, QARecord)
    assert f"{path}:2:" in str(err.value) and message in str(err.value)


def test_duplicate_ids_and_empty_files(tmp_path):
    with pytest.raises(MuleError, match="duplicate id 'a'"):
        read_jsonl(write(tmp_path / "d.jsonl", [QA, QA]), QARecord)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(MuleError, match="no records"):
        read_jsonl(tmp_path / "e.jsonl", QARecord)
    with pytest.raises(MuleError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl", QARecord)


def test_mcq_and_prefill_checks(tmp_path):
    mcq = {"id": "m", "question": "Q?", "choices": ["a", "b", "I do not know."], "answer_index": 3}
    with pytest.raises(MuleError, match=r"m\.jsonl:1: answer_index 3 is out of range"):
        read_jsonl(write(tmp_path / "m.jsonl", [mcq]), MCQRecord)
    with pytest.raises(MuleError, match="non-empty 'prefill'"):
        read_jsonl(write(tmp_path / "p.jsonl", [{"id": "p", "question": "Q", "answer": "A", "prefill": " "}]),
                   PrefillRecord)


def test_write_then_read_round_trip(tmp_path):
    records = read_jsonl(write(tmp_path / "a.jsonl", [QA]), QARecord)
    write_jsonl(tmp_path / "b.jsonl", records)
    assert read_jsonl(tmp_path / "b.jsonl", QARecord) == records


def test_benchmark_loads_domain_and_files(tiny_bench):
    bench = load_benchmark(tiny_bench)
    assert bench.domain.name.startswith("the Moomin books") and "Finnish history" in bench.domain.neighbors
    roles = {r.role for r in bench.train()}
    assert roles == {"forget", "retain", "neighbor", "adversarial", "anchor_pos", "anchor_neg"}
    assert len(bench.eval("neighbor_mcq")) == 2


def test_benchmark_yaml_errors(tiny_bench):
    (tiny_bench / "benchmark.yaml").write_text("name: x\n")
    with pytest.raises(MuleError, match="missing required field 'description'"):
        load_benchmark(tiny_bench)
    (tiny_bench / "benchmark.yaml").unlink()
    with pytest.raises(MuleError, match="benchmark.yaml: file not found"):
        load_benchmark(tiny_bench)
    with pytest.raises(MuleError, match="neither a folder nor a bundled benchmark"):
        load_benchmark(tiny_bench / "nope")
