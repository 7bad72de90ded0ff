"""Benchmark directories: `benchmark.yaml` (the domain) plus train/ and eval/ JSONL files.

Layout (DESIGN.md):
    benchmark.yaml
    train/forget.jsonl train/retain.jsonl train/neighbor.jsonl train/adversarial.jsonl train/anchors.jsonl
    eval/forget_qa.jsonl eval/retain_qa.jsonl eval/neighbor_mcq.jsonl eval/prefill.jsonl eval/utility_mcq.jsonl
A bundled benchmark (`hp`) and a user's folder are the same kind of directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from mule.errors import MuleError, unknown
from mule.records import MCQRecord, PrefillRecord, QARecord, read_jsonl

TRAIN_FILES = ("forget", "retain", "neighbor", "adversarial", "anchors")
EVAL_FILES = {"forget_qa": QARecord, "retain_qa": QARecord, "neighbor_mcq": MCQRecord,
              "prefill": PrefillRecord, "utility_mcq": MCQRecord}
BUNDLED = ("hp",)
DEFAULT_REFUSAL = "I'm sorry, but I don't have any knowledge about that topic."


@dataclass(frozen=True)
class Domain:
    """What to forget, in words: fills the intention prompts (METHOD_SPEC 2.2)."""

    name: str
    description: str
    neighbors: list[str] = field(default_factory=list)
    short_name: str | None = None
    refusal: str = DEFAULT_REFUSAL


def bundled_path(name: str) -> Path:
    """Path of a benchmark shipped inside the package."""
    if name not in BUNDLED:
        raise unknown("bundled benchmark", name, BUNDLED)
    return Path(str(resources.files("mule") / "benchmarks" / name))


def resolve(benchmark: str | Path) -> Path:
    """A folder path, or the name of a bundled benchmark."""
    path = Path(benchmark)
    if path.is_dir():
        return path
    if str(benchmark) in BUNDLED:
        return bundled_path(str(benchmark))
    raise MuleError(f"benchmark {str(benchmark)!r} is neither a folder nor a bundled benchmark ({', '.join(BUNDLED)})")


def load_domain(root: Path) -> Domain:
    path = root / "benchmark.yaml"
    if not path.is_file():
        raise MuleError(f"{path}: file not found (a benchmark directory needs benchmark.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise MuleError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise MuleError(f"{path}: expected a mapping with name, description and neighbors")
    for key in ("name", "description"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise MuleError(f"{path}: missing required field {key!r} (a non-empty string)")
    neighbors = raw.get("neighbors", [])
    if not isinstance(neighbors, list) or not all(isinstance(n, str) for n in neighbors):
        raise MuleError(f"{path}: 'neighbors' must be a list of strings")
    return Domain(name=raw["name"].strip(), description=raw["description"].strip(), neighbors=neighbors,
                  short_name=raw.get("short_name"), refusal=raw.get("refusal") or DEFAULT_REFUSAL)


@dataclass(frozen=True)
class Benchmark:
    root: Path
    domain: Domain

    def train(self, names: tuple[str, ...] = TRAIN_FILES) -> list[QARecord]:
        """All train records of the named files that exist; a missing optional file is skipped."""
        records: list[QARecord] = []
        for name in names:
            if name not in TRAIN_FILES:
                raise unknown("train file", name, TRAIN_FILES)
            path = self.root / "train" / f"{name}.jsonl"
            if path.is_file():
                records += read_jsonl(path, QARecord, allow_empty=True)
        return records

    def eval(self, name: str) -> list:
        if name not in EVAL_FILES:
            raise unknown("eval file", name, EVAL_FILES)
        return read_jsonl(self.root / "eval" / f"{name}.jsonl", EVAL_FILES[name])

    def has_eval(self, name: str) -> bool:
        return (self.root / "eval" / f"{name}.jsonl").is_file()


def load_benchmark(benchmark: str | Path) -> Benchmark:
    root = resolve(benchmark)
    return Benchmark(root=root, domain=load_domain(root))
