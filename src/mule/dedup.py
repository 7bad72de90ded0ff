"""De-duplication of generated records and the leak check against evaluation files (METHOD_SPEC 1.3 step 1).

Two texts are duplicates when their normalised forms are equal (lower case, punctuation and articles dropped,
whitespace collapsed), and, when an embedding model is given, when the cosine similarity of their embeddings
exceeds a threshold (the spec: > 0.9). The embedding model is optional: any local Hugging Face encoder folder
(a sentence-transformers model works: mean pooling over tokens, as those models do by default). Nothing is
downloaded for it; without one only normalised-text matching runs.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

from mule.errors import MuleError

Embedder = Callable[[list[str]], "object"]  # texts -> (N, D) float tensor, rows L2-normalised
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    """Lower case, accents folded, punctuation and articles dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def load_embedder(path: str, batch_size: int = 32) -> Embedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local encoder folder (no download)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if not Path(path).is_dir():
        raise MuleError(f"dedup.embedding_model {path!r}: not a local folder (mule downloads no embedding model; "
                        "leave it unset to match normalised text only)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.nn.functional.normalize(torch.cat(rows).float(), dim=-1)

    return embed


def near_pairs(queries: Sequence[str], refs: Sequence[str], embed: Embedder, threshold: float,
               same: bool = False) -> dict[int, int]:
    """query index -> index of a ref with cosine > threshold. same=True: queries are refs, only earlier ones count."""
    if not queries or (not refs and not same):
        return {}
    q = embed(list(queries))  # (Nq, D)
    r = q if same else embed(list(refs))  # (Nr, D)
    sims = q @ r.T  # (Nq, Nr)
    if same:
        sims = sims.tril(-1)  # only earlier items: the first of a group is kept
    best, where = sims.max(dim=1)
    return {i: int(where[i]) for i in range(len(queries)) if float(best[i]) > threshold}


def dedup(texts: Sequence[str], embed: Embedder | None = None, threshold: float = 0.9) -> tuple[list[int], dict[int, str]]:
    """(indices kept, {dropped index: reason}); the first of a group of duplicates is kept."""
    seen: dict[str, int] = {}
    dropped: dict[int, str] = {}
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in seen:
            dropped[i] = f"duplicate of item {seen[key]}"
        else:
            seen[key] = i
    if embed is not None:
        left = [i for i in range(len(texts)) if i not in dropped]
        for j, k in near_pairs([texts[i] for i in left], [], embed, threshold, same=True).items():
            dropped[left[j]] = f"near-duplicate of item {left[k]}"
    return [i for i in range(len(texts)) if i not in dropped], dropped


def leaks(texts: Sequence[str], eval_texts: Sequence[str], embed: Embedder | None = None,
          threshold: float = 0.9) -> dict[int, str]:
    """{index: the eval text it matches} for texts that repeat an evaluation question (normalised or embedded)."""
    index = {normalise(t): t for t in eval_texts}
    found = {i: index[normalise(t)] for i, t in enumerate(texts) if normalise(t) in index}
    if embed is not None and eval_texts:
        rest = [i for i in range(len(texts)) if i not in found]
        for j, k in near_pairs([texts[i] for i in rest], list(eval_texts), embed, threshold).items():
            found[rest[j]] = eval_texts[k]
    return found


def eval_questions(paths: Sequence[Path]) -> list[str]:
    """Every question in the given JSONL files (QA, MCQ or prefill records; other rows are ignored)."""
    import json

    questions = []
    for path in paths:
        with Path(path).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if isinstance(row, dict) and isinstance(row.get("question"), str):
                        questions.append(row["question"])
    return questions
