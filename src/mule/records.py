"""Typed records, the contract between stages, validated on read with file and line in every error.

Three kinds (DESIGN.md "Records"):
- QA: one question-answer item of one objective and role (train files, eval open QA);
- MCQ: a multiple-choice item, optionally with an "I do not know" option (`refusal_index`);
- Prefill: a prefilling-attack item: the assistant turn opens with `prefill`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from mule.errors import MuleError

ROLES = ("forget", "retain", "neighbor", "adversarial", "anchor_pos", "anchor_neg")
# Roles whose response target is a refusal (taught from the teacher's own generation, METHOD_SPEC 3.3).
REFUSE_ROLES = ("forget", "adversarial", "anchor_pos")


@dataclass(frozen=True)
class QARecord:
    id: str
    objective: int
    role: str
    question: str
    answer: str
    prefill: str | None = None
    anchor_pair_id: str | None = None
    source: str | None = None

    def check(self) -> str | None:
        if self.objective not in (1, 2, 3):
            return f"objective must be 1, 2 or 3, got {self.objective!r}"
        if self.role not in ROLES:
            return f"role must be one of {', '.join(ROLES)}, got {self.role!r}"
        if self.role == "adversarial" and not self.prefill:
            return "an adversarial record needs a non-empty 'prefill'"
        if self.role.startswith("anchor") and not self.anchor_pair_id:
            return "an anchor record needs 'anchor_pair_id'"
        return None


@dataclass(frozen=True)
class MCQRecord:
    id: str
    question: str
    choices: list[str]
    answer_index: int
    refusal_index: int | None = None
    source: str | None = None

    def check(self) -> str | None:
        if len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
            return "'choices' must be a list of at least two strings"
        if not 0 <= self.answer_index < len(self.choices):
            return f"answer_index {self.answer_index} is out of range for {len(self.choices)} choices"
        if self.refusal_index is not None and not 0 <= self.refusal_index < len(self.choices):
            return f"refusal_index {self.refusal_index} is out of range for {len(self.choices)} choices"
        if self.refusal_index is not None and self.refusal_index == self.answer_index:
            return "refusal_index equals answer_index"
        return None


@dataclass(frozen=True)
class PrefillRecord:
    id: str
    question: str
    answer: str
    prefill: str
    entities: list[str] | None = None
    source: str | None = None

    def check(self) -> str | None:
        if not self.prefill.strip():
            return "a prefill record needs a non-empty 'prefill' (the attacker's prefix)"
        if self.entities is not None and not all(isinstance(e, str) for e in self.entities):
            return "'entities' must be a list of strings"
        return None


R = TypeVar("R", QARecord, MCQRecord, PrefillRecord)

_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str, "objective": int, "role": str, "question": str, "answer": str, "prefill": str,
    "anchor_pair_id": str, "source": str, "choices": list, "answer_index": int, "refusal_index": int,
    "entities": list,
}


def parse_record(kind: type[R], obj: Any) -> R:
    """Build one record from a decoded JSON object; raises ValueError with a readable reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    names = {f.name: f for f in fields(kind)}
    required = [n for n, f in names.items() if f.default is MISSING]
    missing = [n for n in required if n not in obj]
    if missing:
        raise ValueError(f"missing required field(s): {', '.join(missing)}")
    values = {}
    for key, value in obj.items():
        if key not in names:
            continue  # extra keys are allowed: users annotate their data
        if value is None and names[key].default is None:
            values[key] = None
            continue
        want = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, want):
            raise ValueError(f"field {key!r} must be {getattr(want, '__name__', want)}, got {value!r}")
        if want is str and key in ("id", "question") and not value.strip():
            raise ValueError(f"field {key!r} is empty")
        values[key] = value
    record = kind(**values)
    problem = record.check()
    if problem:
        raise ValueError(problem)
    return record


def read_jsonl(path: str | Path, kind: type[R], allow_empty: bool = False) -> list[R]:
    """Read and validate a JSONL file of records; every error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise MuleError(f"{path}: file not found")
    records: list[R] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(kind, json.loads(line))
            except json.JSONDecodeError as err:
                raise MuleError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except ValueError as err:
                raise MuleError(f"{path}:{lineno}: {err}") from None
            if record.id in seen:
                raise MuleError(f"{path}:{lineno}: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(record)
    if not records and not allow_empty:
        raise MuleError(f"{path}: no records (the file is empty)")
    return records


def write_jsonl(path: str | Path, rows: list[Any]) -> None:
    """Write dataclass records or dicts as JSONL, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(asdict(row) if hasattr(row, "__dataclass_fields__") else row,
                                    ensure_ascii=False) + "\n")
    tmp.replace(path)
