"""Where raw text and QA come from, and chunking of long text by tokens (METHOD_SPEC 1.2, 1.3, 1.5).

A source is one string:
    path/to/file.txt, path/to/folder      plain text (.txt, .md; a folder is read recursively, sorted)
    path/to/file.jsonl                    one JSON object a line; its `text` field (or question/answer for QA)
    path/saved_with_save_to_disk          a datasets.Dataset folder
    hf:NAME?config=C&split=S&field=F      a Hugging Face dataset by hub name (or a local folder/file)
    muse-books-forget, wmdp-cyber-forget  a named preset (PRESETS)
Options after `?` (any source): field (text column), limit (first N rows), sample (N rows drawn uniformly at
random, seeded by seed, default 0), question/answer (QA columns).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from mule.errors import MuleError, unknown


@dataclass(frozen=True)
class Preset:
    dataset: str
    config: str | None
    split: str
    field: str = "text"
    kind: str = "text"  # text (passages) or qa (question/answer rows)
    note: str = ""


PRESETS = {
    # MUSE-Books (Harry Potter): raw corpora and the knowmem QA used as Obj1 evaluation (METHOD_SPEC 1.5)
    "muse-books-forget": Preset("muse-bench/MUSE-Books", "raw", "forget"),
    "muse-books-retain": Preset("muse-bench/MUSE-Books", "raw", "retain1"),
    "muse-books-retain2": Preset("muse-bench/MUSE-Books", "raw", "retain2"),
    "muse-books-knowmem-forget": Preset("muse-bench/MUSE-Books", "knowmem", "forget_qa", kind="qa"),
    "muse-books-knowmem-retain": Preset("muse-bench/MUSE-Books", "knowmem", "retain_qa", kind="qa"),
    # WMDP corpora
    "wmdp-cyber-forget": Preset("cais/wmdp-corpora", "cyber-forget-corpus", "train"),
    "wmdp-cyber-retain": Preset("cais/wmdp-corpora", "cyber-retain-corpus", "train"),
    "wmdp-bio-retain": Preset("cais/wmdp-corpora", "bio-retain-corpus", "train"),
    "wmdp-bio-forget": Preset("cais/wmdp-bio-forget-corpus", None, "train",
                              note="gated on the hub: request access, then log in with `huggingface-cli login`"),
}
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answer: str
    source: str


@dataclass
class Loaded:
    """What one source gave: passages or QA items, and a fingerprint for manifest.json."""

    spec: str
    passages: list[Passage]
    qa: list[QAItem]
    fingerprint: str

    def describe(self) -> dict:
        return {"source": self.spec, "passages": len(self.passages), "qa": len(self.qa),
                "fingerprint": self.fingerprint}


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    head, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    allowed = {"config", "split", "field", "limit", "sample", "seed", "question", "answer"}
    bad = set(options) - allowed
    if bad:
        raise MuleError(f"source {spec!r}: unknown option(s) {', '.join(sorted(bad))}; valid: {', '.join(sorted(allowed))}")
    return head, options


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _rows(n: int, opts: dict[str, str]) -> list[int]:
    """Indices of the rows to read out of n: the first `limit`, or `sample` drawn uniformly (seeded)."""
    if opts.get("sample"):
        import random

        return sorted(random.Random(int(opts.get("seed", 0))).sample(range(n), min(int(opts["sample"]), n)))
    return list(range(min(int(opts["limit"]), n) if opts.get("limit") else n))


def load_source(spec: str) -> Loaded:
    """Read one source (see the module docstring)."""
    head, opts = _split_spec(spec)
    if head.startswith("hf:"):
        return _from_dataset(spec, head[3:], opts.get("config"), opts.get("split", "train"), opts)
    if head in PRESETS:
        p = PRESETS[head]
        defaults = {"field": p.field} if p.kind == "text" else {"question": "question", "answer": "answer"}
        return _from_dataset(spec, p.dataset, opts.get("config", p.config), opts.get("split", p.split),
                             {**defaults, **opts}, note=p.note)
    path = Path(head).expanduser()
    if not path.exists():
        hint = unknown("source preset", head, PRESETS) if "/" not in head and "." not in head else None
        raise hint or MuleError(f"source {head!r}: no such file or folder (and not hf:NAME or a preset: "
                                f"{', '.join(PRESETS)})")
    if _saved_dataset(path):
        return _from_dataset(spec, str(path), None, opts.get("split", "train"), opts)
    if path.suffix == ".jsonl":
        return _from_jsonl(spec, path, opts)
    return _from_text(spec, path, opts)


def _saved_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _from_text(spec: str, path: Path, opts: dict[str, str]) -> Loaded:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise MuleError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files found")
    passages, digest = [], hashlib.sha256()
    for f in (files[i] for i in _rows(len(files), opts)):
        data = f.read_bytes()
        digest.update(f.name.encode() + b"\0" + data)
        text = data.decode("utf-8", "replace").strip()
        if text:
            name = str(f.relative_to(path)) if path.is_dir() else f.name
            passages.append(Passage(id=name, text=text, source=name))
    return Loaded(spec, passages, [], digest.hexdigest())


def _from_jsonl(spec: str, path: Path, opts: dict[str, str]) -> Loaded:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise MuleError(f"{path}:{lineno}: not valid JSON ({err})") from None
                if not isinstance(rows[-1], dict):
                    raise MuleError(f"{path}:{lineno}: expected a JSON object")
    loaded = _from_rows(spec, [rows[i] for i in _rows(len(rows), opts)], opts, path.name)
    loaded.fingerprint = _sha(path.read_bytes())
    return loaded


def _from_rows(spec: str, rows: list[dict], opts: dict[str, str], name: str) -> Loaded:
    """Rows with a text field become passages; rows with question and answer fields become QA items."""
    text_field, q_field, a_field = opts.get("field", "text"), opts.get("question", "question"), opts.get("answer", "answer")
    passages, qa = [], []
    for n, row in enumerate(rows):
        rid = str(row.get("id", n))
        if isinstance(row.get(q_field), str) and isinstance(row.get(a_field), str) and "field" not in opts:
            qa.append(QAItem(f"{name}:{rid}", row[q_field].strip(), row[a_field].strip(), f"{name}:{rid}"))
        elif isinstance(row.get(text_field), str):
            if row[text_field].strip():
                passages.append(Passage(f"{name}:{rid}", row[text_field].strip(), f"{name}:{rid}"))
        else:
            raise MuleError(f"{spec}: row {n} has neither a string {text_field!r} field nor {q_field!r} and "
                            f"{a_field!r} (set ?field= or ?question=&answer=)")
    return Loaded(spec, passages, qa, "")


def _from_dataset(spec: str, name: str, config: str | None, split: str, opts: dict[str, str],
                  note: str = "") -> Loaded:
    """A datasets.Dataset: a save_to_disk folder, a local data file/folder, or a hub dataset."""
    import datasets

    try:
        if _saved_dataset(Path(name)):
            data = datasets.load_from_disk(name)
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (connection, missing config, gated access)
        extra = f" ({note})" if note else ""
        raise MuleError(f"source {spec!r}: cannot load dataset {name!r} config {config!r} split {split!r}{extra}: "
                        f"{type(err).__name__}: {err}") from None
    if opts.get("limit") or opts.get("sample"):
        data = data.select(_rows(len(data), opts))  # an index mapping: no copy of the other rows
    label = name.rstrip("/").split("/")[-1] + (f"/{config}" if config else "") + f"/{split}"
    loaded = _from_rows(spec, [dict(row) for row in data], opts, label)
    loaded.fingerprint = getattr(data, "_fingerprint", "") or ""
    return loaded


# ---- chunking -------------------------------------------------------------------------------------------------

_SENTENCE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n\s*\n")


class TokenCounter:
    """Counts tokens with a tokenizer (a model name/folder), or words when none is given (an approximation)."""

    def __init__(self, tokenizer_name: str | None = None):
        self.name = tokenizer_name or "words"
        self._tok = None
        if tokenizer_name:
            from transformers import AutoTokenizer

            from mule.models import resolve_model

            self._tok = AutoTokenizer.from_pretrained(resolve_model(tokenizer_name))

    def count(self, text: str) -> int:
        if self._tok is None:
            return len(text.split())
        return len(self._tok(text, add_special_tokens=False)["input_ids"])

    def cut(self, text: str, max_tokens: int) -> list[str]:
        """A text longer than max_tokens (a sentence without an end), cut between words into pieces of about
        max_tokens (a word's tokens are counted alone, with its leading space)."""
        pieces: list[list[str]] = [[]]
        size = 0
        for word in text.split():
            n = self.count(" " + word) if self._tok is not None else 1
            if pieces[-1] and size + n > max_tokens:
                pieces.append([])
                size = 0
            pieces[-1].append(word)
            size += n
        return [" ".join(p) for p in pieces if p]


def chunk_passage(passage: Passage, counter: TokenCounter, max_tokens: int, overlap: int = 0) -> list[Passage]:
    """Split a passage into chunks of at most max_tokens, at sentence/paragraph ends where possible.

    overlap: about this many tokens of the previous chunk's last sentences open the next one (context for
    questions near a boundary). Chunk ids are `<passage id>#<n>`.
    """
    if counter.count(passage.text) <= max_tokens:
        return [passage]
    units: list[tuple[str, int]] = []
    for sentence in (s.strip() for s in _SENTENCE.split(passage.text) if s and s.strip()):
        n = counter.count(sentence)
        pieces = counter.cut(sentence, max_tokens) if n > max_tokens else [sentence]
        units += [(p, counter.count(p) if len(pieces) > 1 else n) for p in pieces]
    chunks: list[list[tuple[str, int]]] = [[]]
    for unit in units:
        size = sum(n for _, n in chunks[-1])
        if chunks[-1] and size + unit[1] > max_tokens:
            carry: list[tuple[str, int]] = []
            for prev in reversed(chunks[-1]):
                if sum(n for _, n in carry) + prev[1] > min(overlap, max_tokens - unit[1]):
                    break
                carry.insert(0, prev)
            chunks.append(carry)
        chunks[-1].append(unit)
    return [Passage(f"{passage.id}#{i}", " ".join(t for t, _ in chunk), passage.source)
            for i, chunk in enumerate(chunks) if chunk]


def chunk_passages(passages: list[Passage], counter: TokenCounter, max_tokens: int, overlap: int = 0) -> list[Passage]:
    if max_tokens <= 0:
        raise MuleError(f"chunk_tokens must be positive, got {max_tokens}")
    return [c for p in passages for c in chunk_passage(p, counter, max_tokens, overlap)]
