"""Metrics registry, Overall Performance against every row the paper reports, and the report outputs.

Golden files live in tests/fixtures/report/; after a deliberate change to the output, regenerate them with
`MULE_UPDATE_GOLDEN=1 python -m pytest -q tests/test_report.py` and read the diff before keeping it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from mule.errors import MuleError
from mule.metrics import METRICS, arrow, op_terms, overall_performance, utility_key_for
from mule.report import (
    radar_chart,
    radar_figure,
    report_markdown,
    results_csv,
    results_json,
    results_table_markdown,
    write_report,
)

GOLDEN = Path(__file__).parent / "fixtures" / "report"
ROWS = json.loads((GOLDEN / "rows.json").read_text(encoding="utf-8"))
BASE = "Base Model"

# METHOD_SPEC 7: (method, Forget, General, Retain Acc, ASR, MMLU, reported OP).
TABLE1 = [
    ("Base Model", 32.1, 84.3, 57.28, 70.5, 60.8, 0.00),
    ("GA", 36.9, 85.0, 55.9, 70.0, 36.45, -29.33),
    ("SimNPO", 21.4, 43.1, 57.7, 70.5, 60.40, -30.48),
    ("FLAT", 0.7, 58.3, 42.7, 39.0, 58.92, 20.44),
    ("SFT", 0.3, 49.6, 50.7, 1.5, 50.2, 48.92),
    ("NGDiff", 13.6, 83.3, 37.7, 17.9, 60.8, 50.52),
    ("MOLLM", 19.9, 83.6, 57.4, 69.2, 60.8, 12.92),
    ("Ensemble Teacher (ET)", 6.2, 60.9, 26.8, 13.5, 60.3, 28.52),
    ("DUET (w/ ET)", 3.2, 71.3, 26.8, 39.5, 49.9, 5.52),
    ("Ours", 2.7, 78.1, 58.5, 12.5, 59.2, 80.82),
    ("Upper Bound (oracle router)", 2.1, 80.1, 58.5, 6.7, 60.7, 90.72),
]
TABLE2 = [  # OP against Table 1's Base row
    ("Ours", 2.7, 78.1, 58.5, 12.5, 58.2, 79.82),
    ("Ours w/ DUET loss", 3.19, 74.0, 57.6, 12.5, 58.2, 74.33),
    ("Ours w/ BiLD loss", 3.9, 82.3, 56.3, 23.5, 58.3, 69.72),
]
TABLE3 = [
    ("Base Model", 68.5, 88.1, 96.3, 60.7, 59.9, 0.00),
    ("Ensemble Teacher (ET)", 20.8, 64.4, 86.0, 50.7, 59.4, 23.20),
    ("DUET (w/ ET)", 25.5, 91.1, 95.3, 24.7, 50.6, 71.70),
    ("SFT", 34.2, 87.1, 95.3, 44.7, 57.4, 45.80),
    ("NGDiff", 17.3, 63.8, 90.6, 40.0, 59.88, 41.88),
    ("MOLLM", 17.2, 66.3, 89.7, 35.3, 59.77, 48.17),
    ("Ours", 8.1, 89.1, 88.8, 5.1, 56.9, 106.50),
    ("Upper Bound", 6.7, 93.1, 90.7, 3.3, 59.9, 118.60),
]


def paper_metrics(row: tuple) -> dict[str, float]:
    _, forget, general, retain, asr, mmlu, _ = row
    return {"forget": forget, "general": general, "neighbor_acc": retain, "asr": asr, "mmlu": mmlu}


PAPER_CASES = ([pytest.param(r, TABLE1[0], id=f"T1-{r[0]}") for r in TABLE1]
               + [pytest.param(r, TABLE1[0], id=f"T2-{r[0]}") for r in TABLE2]
               + [pytest.param(r, TABLE3[0], id=f"T3-{r[0]}") for r in TABLE3])


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("MULE_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


def row(name: str, kind: str, **metrics: float) -> dict:
    return {"name": name, "kind": kind, "metrics": metrics}


# ---- metrics and OP -----------------------------------------------------------------------------------


def test_registry_keys_and_directions():
    assert all(key == metric.key for key, metric in METRICS.items())
    assert [k for k, m in METRICS.items() if not m.higher_is_better] == [
        "forget", "forget_f1", "neighbor_refusal", "asr", "asr_rule", "asr_judge"]
    assert arrow("forget") == "↓" and arrow("mmlu") == "↑"
    with pytest.raises(MuleError, match="Did you mean 'forget'"):
        arrow("forgett")


@pytest.mark.parametrize("paper_row, base_row", PAPER_CASES)
def test_op_matches_every_paper_row(paper_row, base_row):
    op = overall_performance(paper_metrics(paper_row), paper_metrics(base_row))
    assert round(op, 2) == pytest.approx(paper_row[-1], abs=1e-9)


def test_op_terms_worked_example_ga():
    """METHOD_SPEC 5.5: (32.1-36.9) + (85.0-84.3) + (55.9-57.28) + (70.5-70.0) + (36.45-60.8) = -29.33."""
    terms = op_terms(paper_metrics(TABLE1[1]), paper_metrics(TABLE1[0]))
    assert list(terms) == ["forget", "general", "neighbor_acc", "asr", "mmlu"]
    assert [round(v, 2) for v in terms.values()] == [-4.8, 0.7, -1.38, 0.5, -24.35]


def test_op_falls_back_to_utility_without_mmlu():
    base = {"forget": 30, "general": 80, "neighbor_acc": 50, "asr": 60, "utility": 70, "mmlu": 60}
    method = {"forget": 10, "general": 75, "neighbor_acc": 55, "asr": 20, "utility": 68}
    assert utility_key_for(method, base) == "utility"
    assert overall_performance(method, base) == pytest.approx(20 - 5 + 5 + 40 - 2)
    method["mmlu"] = 50
    assert overall_performance(method, base) == pytest.approx(20 - 5 + 5 + 40 - 10)
    assert overall_performance(method, base, utility_key="utility") == pytest.approx(58)


@pytest.mark.parametrize("missing", ["forget", "general", "neighbor_acc", "asr", "utility"])
def test_missing_metric_raises_naming_it(missing):
    full = {"forget": 30, "general": 80, "neighbor_acc": 50, "asr": 60, "utility": 70}
    method = {k: v for k, v in full.items() if k != missing}
    with pytest.raises(MuleError, match=f"'{missing}'.*method row"):
        overall_performance(method, full)
    with pytest.raises(MuleError, match=f"'{missing}'.*base row"):
        overall_performance(full, {**full, missing: None})


# ---- table, CSV, JSON ---------------------------------------------------------------------------------


def test_golden_markdown_table():
    check_golden("table.md", results_table_markdown(ROWS, BASE))


def test_golden_csv():
    check_golden("results.csv", results_csv(ROWS, BASE))


def test_golden_report_markdown():
    check_golden("report.md", report_markdown(ROWS, BASE, "HP demo", ["target preparation was used"]))


def test_table_layout_base_first_and_mmlu_only_when_present():
    table = results_table_markdown(list(reversed(ROWS)), BASE)
    lines = table.splitlines()
    assert lines[0] == ("| Method | Forget ↓ | General ↑ | Retain Acc ↑ | Refusal ↓ | ASR ↓ | Utility ↑ "
                        "| OP ↑ |")
    assert lines[2].startswith("| Base Model |") and lines[2].endswith("| 0.00 |")
    with_mmlu = [dict(r, metrics={**r["metrics"], "mmlu": 60.0}) for r in ROWS]
    assert "| MMLU ↑ | OP ↑ |" in results_table_markdown(with_mmlu, BASE)


def test_bold_best_trained_only_with_ties():
    rows = [row("B", "base", forget=30, general=80, neighbor_acc=50, asr=60, utility=70),
            row("IC", "in-context", forget=1, general=99, neighbor_acc=99, asr=1, utility=99),
            row("T1", "trained", forget=5.04, general=70, neighbor_acc=55, asr=20, utility=60),
            row("T2", "trained", forget=4.96, general=75, neighbor_acc=40, asr=30, utility=60)]
    cells = {line.split(" | ")[0].strip("| †"): line.split(" | ")[1:] for line in
             results_table_markdown(rows, "B", ["forget", "general", "utility"]).splitlines()[2:]}
    assert cells["IC"] == ["1.0", "99.0", "99.0", "185.00 |"]  # in-context never bold
    assert cells["T1"][0] == "**5.0**" and cells["T2"][0] == "**5.0**"  # tie as shown: both bold
    assert cells["T2"][1] == "**75.0**" and cells["T1"][1] == "70.0"  # higher is better
    assert cells["T1"][2] == "**60.0**" and cells["T2"][2] == "**60.0**"
    assert cells["T1"][3] == "**49.96** |"  # OP: 24.96 - 10 + 5 + 40 - 10


def test_missing_op_metric_shows_dash_and_null():
    rows = [row("B", "base", forget=30, general=80, neighbor_acc=50, asr=60, utility=70),
            row("T", "trained", forget=5, general=75, neighbor_acc=40, utility=60)]
    assert results_table_markdown(rows, "B").splitlines()[3] == (
        "| T | **5.0** | **75.0** | **40.0** | – | – | **60.0** | – |")
    data = results_json(rows, "B")
    assert data["rows"][1]["op"] is None and data["rows"][1]["op_terms"] is None
    assert results_csv(rows, "B").splitlines()[2] == "T,trained,5.0,75.0,40.0,,60.0,"


def test_results_json_content():
    data = results_json(ROWS, BASE)
    assert data["base"] == BASE and data["utility_key"] == "utility"
    assert [r["name"] for r in data["rows"]] == [r["name"] for r in ROWS]
    assert data["metrics"]["forget"]["higher_is_better"] is False
    ours = data["rows"][3]
    assert ours["op"] == 80.42 and ours["op_terms"]["asr"] == 58.0 and ours["notes"]
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize("rows, base, message", [
    (ROWS, "Nope", "base row 'Nope'"),
    (ROWS + [ROWS[1]], BASE, "duplicate"),
    ([{**ROWS[0], "kind": "finetuned"}], BASE, "'kind' must be one of"),
    ([{**ROWS[0], "metrics": {"forget": "high"}}], BASE, "metric 'forget' must be a number"),
])
def test_bad_rows_raise(rows, base, message):
    with pytest.raises(MuleError, match=message):
        results_csv(rows, base)


def test_unknown_column_raises():
    with pytest.raises(MuleError, match="unknown metric 'asrr'"):
        results_table_markdown(ROWS, BASE, ["forget", "asrr"])


# ---- radar chart and report folder --------------------------------------------------------------------


def test_radar_figure_axes_lines_and_direction():
    fig = radar_figure(ROWS, BASE)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "Forget ↓ (100-x)", "General ↑", "Retain Acc ↑", "ASR ↓ (100-x)", "Utility ↑"]
    lines = ax.get_lines()
    assert len(lines) == len(ROWS)
    assert [line.get_label() for line in lines][:2] == ["Base Model", "Ensemble Teacher (ET) †"]
    radii = list(lines[0].get_ydata())
    assert radii[:5] == pytest.approx([100 - 32.1, 84.3, 57.28, 100 - 70.5, 61.2])
    assert radii[5] == radii[0]  # the polygon is closed


def test_radar_uses_mmlu_when_every_row_has_it():
    with_mmlu = [dict(r, metrics={**r["metrics"], "mmlu": 60.0}) for r in ROWS]
    (ax,) = radar_figure(with_mmlu, BASE).axes
    assert ax.get_xticklabels()[-1].get_text() == "MMLU ↑"


def test_radar_chart_writes_png(tmp_path):
    path = radar_chart(ROWS, BASE, tmp_path / "sub" / "radar.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 500
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_report_writes_all_four_files(tmp_path):
    paths = write_report(ROWS, BASE, tmp_path / "out", "HP demo", ["target preparation was used"])
    assert set(paths) == {"report.md", "results.csv", "results.json", "radar.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    report = paths["report.md"].read_text(encoding="utf-8")
    assert report.startswith("# HP demo\n") and "- target preparation was used\n" in report
    assert results_table_markdown(ROWS, BASE) in report and "![" in report and "(radar.png)" in report
    assert paths["results.csv"].read_text(encoding="utf-8") == results_csv(ROWS, BASE)
    assert json.loads(paths["results.json"].read_text(encoding="utf-8")) == results_json(ROWS, BASE)
    assert not list((tmp_path / "out").glob("*.tmp"))
