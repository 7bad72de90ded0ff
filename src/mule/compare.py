"""`mule compare` and `mule report`: train and evaluate a grid of methods on one benchmark, then tabulate.

A grid config names the in-context systems to evaluate and the methods to train (each an `unlearn` config
fragment merged over `unlearn_defaults`). Every finished piece is kept on disk and skipped on a rerun; an
interrupted training run resumes from its checkpoint.

    out/eval/<row>/metrics.json   one evaluation per row (systems and methods)
    out/runs/<method>/            one `mule unlearn` run directory per method
    out/report.md results.csv results.json radar.png
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mule.config import UnlearnConfig, build
from mule.errors import MuleError
from mule.evaluate import EvalConfig, run_eval

log = logging.getLogger(__name__)


@dataclass
class GridMethod:
    name: str
    unlearn: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridConfig:
    benchmark: str = "hp"
    model: str = "smollm2-135m"
    output_dir: str = "runs/compare"
    title: str = "mule comparison"
    systems: list[str] = field(default_factory=lambda: ["base", "ensemble", "oracle"])
    methods: list[GridMethod] = field(default_factory=list)
    unlearn_defaults: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines printed above the table (e.g. target preparation)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def eval_config(grid: GridConfig, out: Path, **extra) -> EvalConfig:
    raw = _merge({"benchmark": grid.benchmark, "model": grid.model}, grid.eval)
    return build(EvalConfig, _merge(raw, {"output_dir": str(out), **extra}), "eval")


def unlearn_config(grid: GridConfig, method: GridMethod, out: Path) -> UnlearnConfig:
    raw = _merge({"benchmark": grid.benchmark, "model": {"name": grid.model}}, grid.unlearn_defaults)
    raw = _merge(raw, method.unlearn)
    raw["output_dir"] = str(out)
    return build(UnlearnConfig, raw, f"methods[{method.name}].unlearn")


def evaluate_once(config: EvalConfig) -> dict:
    path = Path(config.output_dir) / "metrics.json"
    if not path.is_file():
        run_eval(config)
    else:
        log.info("skip %s: already evaluated", path.parent)
    return json.loads(path.read_text())


def run_compare(grid: GridConfig) -> dict[str, Path]:
    """Evaluate the systems, train + evaluate the methods, write the report; returns the report's files."""
    from mule.train import run_unlearn

    out = Path(grid.output_dir)
    if "base" not in grid.systems:
        raise MuleError("a grid needs the 'base' system: Overall Performance is relative to the base row")
    rows = []
    for system in grid.systems:
        result = evaluate_once(eval_config(grid, out / "eval" / system, system=system))
        rows.append({"name": system, "kind": "base" if system == "base" else "in-context",
                     "metrics": result["metrics"]})
    for method in grid.methods:
        run_dir = out / "runs" / method.name
        if not (run_dir / "result.json").is_file():
            run_unlearn(unlearn_config(grid, method, run_dir), ["compare", method.name])
        result = evaluate_once(eval_config(grid, out / "eval" / method.name, run=str(run_dir)))
        rows.append({"name": method.name, "kind": "trained", "metrics": result["metrics"]})
    return report_rows(rows, out, grid.title, grid.notes)


def report_rows(rows: list[dict], out: Path, title: str, notes: list[str] = ()) -> dict[str, Path]:
    from mule.report import write_report

    return write_report(rows, "base", out, title, preamble_lines=list(notes))


def rows_from_dirs(paths: list[str]) -> list[dict]:
    """Rows for `mule report` from evaluation folders (each with metrics.json); the 'base' system is the base."""
    rows = []
    for p in paths:
        path = Path(p) / "metrics.json"
        if not path.is_file():
            raise MuleError(f"{path}: not found (run `mule eval` first)")
        result = json.loads(path.read_text())
        trained = result["config"].get("run") is not None
        kind = "trained" if trained else ("base" if result["system"] == "base" else "in-context")
        rows.append({"name": Path(p).name, "kind": kind, "metrics": result["metrics"]})
    if not any(r["kind"] == "base" for r in rows):
        raise MuleError("mule report needs the evaluation of the base model (system base, no run) among its inputs")
    for r in rows:
        if r["kind"] == "base":
            r["name"] = "base"
    return rows
