"""Response targets per record (METHOD_SPEC 3.3), with the teacher's generations cached in the run directory.

Answer-type records (retain, neighbour, negative anchors) are aligned on their gold answer. Refuse-type records
(forget, adversarial, positive anchors) are aligned on what the prompted teacher itself says, generated once,
greedily: teacher-forcing the gold forget answer would teach the student to continue the leak. SFT trains on
refusal templates instead; the likelihood baselines (GA, NPO, ...) on the gold answers they push away from.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from mule.benchmark import DEFAULT_REFUSAL
from mule.chat import ChatFormatter
from mule.errors import MuleError
from mule.generation import greedy_generate
from mule.records import REFUSE_ROLES, QARecord
from mule.refusal import is_refusal

log = logging.getLogger(__name__)


def target_key(system: str | None, record: QARecord, max_new_tokens: int, model_name: str) -> str:
    blob = json.dumps([system, record.question, record.prefill, max_new_tokens, model_name])
    return hashlib.sha1(blob.encode()).hexdigest()


FORGET_TARGETS = ("teacher_generated", "gold_answer", "refusal")  # "refusal" is pinned by SFT


def needs_generation(record: QARecord, forget_target: str) -> bool:
    if forget_target not in FORGET_TARGETS:
        raise MuleError(f"method.forget_target must be one of {', '.join(FORGET_TARGETS)}, got {forget_target!r}")
    return forget_target == "teacher_generated" and record.role in REFUSE_ROLES


# Generic refusals; each opens with a marker `mule.refusal.is_refusal` recognises.
GENERIC_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I don't know.",
    "I'm not able to help with that.",
    "I don't have any knowledge about that.",
    "I'm sorry, I don't know the answer to that.",
    "I cannot answer that question.",
    "I have no knowledge of that topic.",
    "I'm unable to answer that.",
    "I do not know anything about that.",
    "I'm sorry, but that is outside what I know.",
    "I can't answer that, sorry.",
    "I don't know anything about that topic.",
    "I'm not able to answer that question.",
    "I am sorry, but I have no information about that.",
    "I cannot help with that question.",
    "I'm unable to provide information on that.",
    "I do not have any knowledge about that subject.",
    "I'm sorry, I can't answer that.",
    "I can't provide any information about that, sorry.",
)


def refusal_templates(refusal: str | None, mode: str = "templates") -> list[str]:
    """Refusal targets: the domain's sentence, plus 19 generic phrasings in mode "templates" (METHOD_SPEC 4.4
    samples from ~20), or the domain's sentence alone in mode "domain"."""
    first = refusal or DEFAULT_REFUSAL
    if mode == "domain":
        return [first]
    if mode != "templates":
        raise MuleError(f"method.refusals must be 'templates' or 'domain', got {mode!r}")
    return [first] + [t for t in GENERIC_REFUSALS if t != first]


def pick_refusal(record_id: str, templates: list[str]) -> str:
    """One template per record, drawn by a hash of its id: the same on every run and every process."""
    return templates[int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % len(templates)]


def fixed_target(record: QARecord, forget_target: str, refusal: str | None,
                 templates: list[str] | None = None) -> str:
    """The target of a record whose target is not generated: a refusal (SFT) or the gold answer."""
    if forget_target == "refusal" and record.role in REFUSE_ROLES:
        return pick_refusal(record.id, templates) if templates else (refusal or DEFAULT_REFUSAL)
    return record.answer


def _read_cache(path: Path) -> dict[str, str]:
    cache: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                cache[row["key"]] = row["text"]
    return cache


def response_targets(records: list[QARecord], systems: dict[int, str | None], formatter: ChatFormatter, model,
                     cache_path: Path, model_name: str, forget_target: str, max_new_tokens: int = 48,
                     batch_size: int = 16, refusal: str | None = None, templates: list[str] | None = None
                     ) -> tuple[dict[str, str], float | None]:
    """{record id: response text} and the share of teacher generations that refuse (None if none generated).

    forget_target "refusal" gives refuse-type records a template from `templates` (default: `refusal` alone).
    """
    cache = _read_cache(cache_path)
    keys = {r.id: target_key(systems[r.objective], r, max_new_tokens, model_name)
            for r in records if needs_generation(r, forget_target)}
    todo = [r for r in records if r.id in keys and keys[r.id] not in cache]
    for system in dict.fromkeys(systems[r.objective] for r in todo):  # one call per prompt: its K/V once
        group = [r for r in todo if systems[r.objective] == system]
        texts = greedy_generate(model, formatter.tokenizer, [formatter.body_ids(r.question, r.prefill) for r in group],
                                max_new_tokens, batch_size, desc="teacher targets", prefix=formatter.prefix_ids(system))
        with cache_path.open("a", encoding="utf-8") as handle:
            for record, text in zip(group, texts):
                cache[keys[record.id]] = text
                handle.write(json.dumps({"key": keys[record.id], "id": record.id, "text": text}) + "\n")
    out = {r.id: (cache[keys[r.id]] if r.id in keys else fixed_target(r, forget_target, refusal, templates))
           for r in records}
    generated = [out[i] for i in keys]
    share = sum(is_refusal(t, refusal) for t in generated) / len(generated) if generated else None
    if share is not None and share < 0.95:
        log.warning("only %.0f%% of the teacher's %d generated targets refuse (METHOD_SPEC 3.3 asks for >= 95%%): "
                    "the teacher does not follow its intention prompt well on this model", 100 * share,
                    len(generated))
    return out, share
