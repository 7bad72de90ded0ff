"""Reports: pure functions from result rows (metrics JSON) to markdown, CSV, JSON and a radar PNG.

A result row is `{"name": str, "kind": "base" | "in-context" | "trained", "metrics": {key: value},
"notes": optional str}`; one row, named by the `base` argument, is the reference for Overall Performance.
The table follows the paper's Table 1, the radar chart its Figure 3 (METHOD_SPEC 5.5, 7). Every
direction (arrows, bold, OP signs, radar axes) comes from the metric's `higher_is_better`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mule.errors import MuleError
from mule.metrics import METRICS, arrow, get_metric, has_value, op_terms, overall_performance

Row = Mapping[str, Any]

KINDS = ("base", "in-context", "trained")
DEFAULT_COLUMNS = ("forget", "general", "neighbor_acc", "neighbor_refusal", "asr", "utility", "mmlu")
OPTIONAL_COLUMNS = ("mmlu",)  # shown only when some row has it
MISSING = "–"
IN_CONTEXT_MARK = "†"
DECIMALS = 1
OP_DECIMALS = 2
RADAR_TITLE = "Results per objective (outward is better)"


# ---- rows ---------------------------------------------------------------------------------------------


def _check_row(row: Any) -> str | None:
    """Why `row` is not a valid result row, or None."""
    if not isinstance(row, Mapping) or not isinstance(row.get("name"), str) or not row["name"].strip():
        return "a result row must be an object with a non-empty 'name'"
    if row.get("kind") not in KINDS:
        return f"row {row['name']!r}: 'kind' must be one of {', '.join(KINDS)}, got {row.get('kind')!r}"
    if not isinstance(row.get("metrics"), Mapping):
        return f"row {row['name']!r}: 'metrics' must be an object"
    for key, value in row["metrics"].items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"row {row['name']!r}: metric {key!r} must be a number, got {value!r}"
    if row.get("notes") is not None and not isinstance(row["notes"], str):
        return f"row {row['name']!r}: 'notes' must be a string"
    return None


def ordered_rows(rows: Sequence[Row], base: str) -> list[Row]:
    """Validate the rows and return them with the base row first (the others keep their order)."""
    for row in rows:
        problem = _check_row(row)
        if problem:
            raise MuleError(problem)
    names = [row["name"] for row in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MuleError(f"duplicate result row name(s): {', '.join(duplicates)}")
    if base not in names:
        raise MuleError(f"base row {base!r} is not among the results ({', '.join(names) or 'none'})")
    return [rows[names.index(base)]] + [row for row in rows if row["name"] != base]


def table_utility_key(rows: Sequence[Row]) -> str:
    """The utility term of OP for a whole table: 'mmlu' when every row has it, else 'utility'.

    Chosen once per table, not per row, so that every OP in one table is computed the same way.
    """
    return "mmlu" if all(has_value(row["metrics"], "mmlu") for row in rows) else "utility"


def row_op(row: Row, base_row: Row, utility_key: str) -> float | None:
    """The row's OP against the base row, or None when a metric that OP needs is missing."""
    try:
        return overall_performance(row["metrics"], base_row["metrics"], utility_key)
    except MuleError:
        return None


def shown_columns(rows: Sequence[Row], columns: Iterable[str]) -> list[str]:
    """The columns to show: unknown keys raise; optional ones (MMLU) appear only when a row has them."""
    keys = [get_metric(key).key for key in columns]
    return [k for k in keys if k not in OPTIONAL_COLUMNS or any(has_value(r["metrics"], k) for r in rows)]


# ---- markdown table -----------------------------------------------------------------------------------


def _fmt(value: float | None, decimals: int) -> str:
    return MISSING if value is None else f"{value:.{decimals}f}"


def _best(rows: Sequence[Row], values: Sequence[float | None], higher: bool, decimals: int) -> set[str]:
    """Names of the trained rows with the best value as shown (rounded to `decimals`); ties all win."""
    shown = {row["name"]: round(v, decimals) for row, v in zip(rows, values)
             if row["kind"] == "trained" and v is not None}
    if not shown:
        return set()
    best = max(shown.values()) if higher else min(shown.values())
    return {name for name, v in shown.items() if v == best}


def _table_cells(rows: Sequence[Row], base_row: Row, columns: Sequence[str]) -> list[list[str]]:
    """Formatted cells per column, (metric columns..., OP), each a list over rows, best trained in bold."""
    utility_key = table_utility_key(rows)
    series = [([row["metrics"].get(k) if has_value(row["metrics"], k) else None for row in rows],
               get_metric(k).higher_is_better, DECIMALS) for k in columns]
    series.append(([row_op(row, base_row, utility_key) for row in rows], True, OP_DECIMALS))
    cells = []
    for values, higher, decimals in series:
        best = _best(rows, values, higher, decimals)
        cells.append([f"**{_fmt(v, decimals)}**" if row["name"] in best else _fmt(v, decimals)
                      for row, v in zip(rows, values)])
    return cells


def method_cell(row: Row) -> str:
    """The Method cell: the name, marked with † for an in-context (untrained) system."""
    return row["name"] + (f" {IN_CONTEXT_MARK}" if row["kind"] == "in-context" else "")


def results_table_markdown(rows: Sequence[Row], base: str, columns: Sequence[str] = DEFAULT_COLUMNS) -> str:
    """The results as a markdown table laid out like the paper's Table 1.

    Method | Forget ↓ | General ↑ | Retain Acc ↑ | Refusal ↓ | ASR ↓ | Utility ↑ (| MMLU ↑) | OP ↑; base
    row first (OP 0.00), values to 1 decimal and OP to 2, the best trained value of each column in bold,
    "–" for a missing value (and for OP when a metric it needs is missing).
    """
    rows = ordered_rows(rows, base)
    keys = shown_columns(rows, columns)
    header = ["Method"] + [f"{METRICS[k].label} {arrow(k)}" for k in keys] + ["OP ↑"]
    cells = _table_cells(rows, rows[0], keys)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join([method_cell(row)] + [col[i] for col in cells]) + " |")
    return "\n".join(lines) + "\n"


# ---- CSV and JSON -------------------------------------------------------------------------------------


def metric_keys(rows: Sequence[Row]) -> list[str]:
    """Registered metric keys that some row has, in registry order."""
    return [key for key in METRICS if any(has_value(row["metrics"], key) for row in rows)]


def _number(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)  # 4 decimals hide float noise in OP


def results_csv(rows: Sequence[Row], base: str) -> str:
    """CSV: header name,kind,<metric keys>,op; one line per method, base first; missing values empty."""
    rows = ordered_rows(rows, base)
    keys, utility_key = metric_keys(rows), table_utility_key(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "kind", *keys, "op"])
    for row in rows:
        values = [row["metrics"][k] if has_value(row["metrics"], k) else None for k in keys]
        values.append(row_op(row, rows[0], utility_key))
        writer.writerow([row["name"], row["kind"], *("" if v is None else _number(v) for v in values)])
    return out.getvalue()


def _json_row(row: Row, base_row: Row, utility_key: str) -> dict[str, Any]:
    """One row of results.json; op and op_terms are None when a metric that OP needs is missing."""
    op = row_op(row, base_row, utility_key)
    terms = None
    if op is not None:
        terms = {k: _number(v) for k, v in op_terms(row["metrics"], base_row["metrics"], utility_key).items()}
    return {"name": row["name"], "kind": row["kind"], "notes": row.get("notes"),
            "metrics": {k: _number(v) for k, v in row["metrics"].items() if has_value(row["metrics"], k)},
            "op": _number(op), "op_terms": terms}


def results_json(rows: Sequence[Row], base: str) -> dict[str, Any]:
    """The results as one JSON-ready dict: base, OP's utility key, metric metadata and rows with OP terms."""
    rows = ordered_rows(rows, base)
    utility_key = table_utility_key(rows)
    return {"base": base, "utility_key": utility_key,
            "metrics": {k: {"label": METRICS[k].label, "higher_is_better": METRICS[k].higher_is_better,
                            "unit": METRICS[k].unit, "description": METRICS[k].description}
                        for k in metric_keys(rows)},
            "rows": [_json_row(row, rows[0], utility_key) for row in rows]}


# ---- legend and OP terms ------------------------------------------------------------------------------


def legend_paragraph(rows: Sequence[Row], base: str) -> str:
    """One paragraph explaining arrows, bold, † and OP for the table of these rows."""
    utility = METRICS[table_utility_key(ordered_rows(rows, base))].label
    return (f"All values are percentages (0-100); ↑ marks a metric where higher is better, ↓ one where lower "
            f"is better. Bold marks the best trained method in each column (ties are all bold); the base "
            f"row and in-context systems ({IN_CONTEXT_MARK}, no training) do not compete. OP (Overall "
            f"Performance, ↑) is the sum of the gains over the base row {base!r}, in percentage points with "
            f"equal weights: (Forget_base - Forget) + (General - General_base) + (Retain Acc - Retain "
            f"Acc_base) + (ASR_base - ASR) + ({utility} - {utility}_base); the base row scores 0 and a "
            f"positive OP beats it. {MISSING} marks a missing value.")


def op_terms_markdown(rows: Sequence[Row], base: str) -> str:
    """A small markdown table of each non-base row's five OP terms (the footnote to OP)."""
    rows = ordered_rows(rows, base)
    utility_key = table_utility_key(rows)
    keys = ("forget", "general", "neighbor_acc", "asr", utility_key)
    header = ["Method"] + [f"Δ {METRICS[k].label}" for k in keys] + ["OP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows[1:]:
        op = row_op(row, rows[0], utility_key)
        terms = op_terms(row["metrics"], rows[0]["metrics"], utility_key) if op is not None else {}
        cells = [_fmt(terms.get(k), OP_DECIMALS) for k in keys] + [_fmt(op, OP_DECIMALS)]
        lines.append("| " + " | ".join([method_cell(row)] + cells) + " |")
    return "\n".join(lines) + "\n"


# ---- radar chart --------------------------------------------------------------------------------------


def radar_columns(rows: Sequence[Row]) -> list[str]:
    """The radar axes of Figure 3: Forget, General, Retain Acc, ASR and MMLU (or Utility)."""
    return ["forget", "general", "neighbor_acc", "asr", table_utility_key(rows)]


def radar_label(key: str) -> str:
    """Axis label; a lower-is-better metric is plotted as (100 - x) so that outward is better."""
    metric = get_metric(key)
    return f"{metric.label} {arrow(key)}" + ("" if metric.higher_is_better else " (100-x)")


def radar_values(row: Row, columns: Sequence[str]) -> list[float]:
    """The row's radar radii: x or (100 - x) by direction; NaN (a gap in the polygon) when missing."""
    out = []
    for key in columns:
        if not has_value(row["metrics"], key):
            out.append(float("nan"))
            continue
        value = float(row["metrics"][key])
        out.append(value if get_metric(key).higher_is_better else 100.0 - value)
    return out


_LINESTYLES = {"base": "--", "in-context": ":", "trained": "-"}


def radar_figure(rows: Sequence[Row], base: str, columns: Sequence[str] | None = None,
                 title: str = RADAR_TITLE) -> Any:
    """A matplotlib Figure with one polygon per method and one axis per metric, outward is better.

    Built on the Agg canvas without pyplot, so it works headless and leaves the global backend alone.
    """
    import math

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: matplotlib is slow to load
    from matplotlib.figure import Figure

    rows = ordered_rows(rows, base)
    keys = [get_metric(k).key for k in (columns or radar_columns(rows))]
    angles = [2 * math.pi * i / len(keys) for i in range(len(keys))]
    fig = Figure(figsize=(8, 6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(math.pi / 2)  # first axis at the top, then clockwise, as in the paper's Figure 3
    ax.set_theta_direction(-1)
    for row in rows:
        radii = radar_values(row, keys)
        missing = [METRICS[k].label for k, r in zip(keys, radii) if math.isnan(r)]
        label = method_cell(row) + (f" (no {', '.join(missing)})" if missing else "")
        (line,) = ax.plot(angles + angles[:1], radii + radii[:1], _LINESTYLES[row["kind"]], linewidth=1.5,
                          label=label)
        ax.fill(angles, [0.0 if math.isnan(r) else r for r in radii], color=line.get_color(), alpha=0.06)
    ax.set_xticks(angles)
    ax.set_xticklabels([radar_label(k) for k in keys])
    ax.set_ylim(0, 100)
    ax.set_yticks([20, 40, 60, 80, 100])
    ax.set_rlabel_position(180 / len(keys))  # radial numbers between the first two axes, off the labels
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", pad=8)
    ax.set_title(title, pad=20)
    ax.legend(loc="upper left", bbox_to_anchor=(1.1, 1.05), fontsize=8)
    return fig


def radar_chart(rows: Sequence[Row], base: str, path: str | Path, columns: Sequence[str] | None = None,
                title: str = RADAR_TITLE) -> Path:
    """Save the radar chart (paper's Figure 3) as a PNG at dpi 150, atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    radar_figure(rows, base, columns, title).savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    tmp.replace(path)
    return path


# ---- the report folder --------------------------------------------------------------------------------


def report_markdown(rows: Sequence[Row], base: str, title: str, preamble_lines: Sequence[str] = ()) -> str:
    """report.md: title, preamble bullets, the table, per-row notes, the legend, OP terms, the radar image."""
    rows = ordered_rows(rows, base)
    parts = [f"# {title}\n"]
    if preamble_lines:
        parts.append("".join(f"- {line}\n" for line in preamble_lines))
    parts.append(results_table_markdown(rows, base))
    notes = [f"- {method_cell(row)}: {row['notes']}\n" for row in rows if row.get("notes")]
    if notes:
        parts.append("Notes:\n\n" + "".join(notes))
    parts.append(legend_paragraph(rows, base) + "\n")
    parts.append("## OP terms\n\nGain over the base row per term, in percentage points.\n\n"
                 + op_terms_markdown(rows, base))
    parts.append("## Radar chart\n\n![Radar chart: outward is better on every axis](radar.png)\n")
    return "\n".join(parts)


def _write_text(path: Path, text: str) -> Path:
    """Write text atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_report(rows: Sequence[Row], base: str, out_dir: str | Path, title: str,
                 preamble_lines: Sequence[str] = ()) -> dict[str, Path]:
    """Write report.md, results.csv, results.json and radar.png into out_dir; return them by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "report.md": _write_text(out / "report.md", report_markdown(rows, base, title, preamble_lines)),
        "results.csv": _write_text(out / "results.csv", results_csv(rows, base)),
        "results.json": _write_text(out / "results.json",
                                    json.dumps(results_json(rows, base), indent=2, ensure_ascii=False) + "\n"),
        "radar.png": radar_chart(rows, base, out / "radar.png"),
    }
