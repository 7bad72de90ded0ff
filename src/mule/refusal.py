"""Is a reply a refusal? Used to check teacher targets and, in evaluation, refusal rates."""

from __future__ import annotations

import re

MARKERS = ("i'm sorry", "i am sorry", "i don't have any knowledge", "i do not have any knowledge", "i don't know",
           "i do not know", "i cannot", "i can't", "i can not", "i have no knowledge", "i'm not able",
           "i am not able", "i'm unable", "i am unable")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u2019", "'")).strip().lower()


def is_refusal(text: str, refusal: str | None = None) -> bool:
    """True when the reply contains the domain's refusal sentence or opens with a refusal marker."""
    reply = _norm(text)
    if refusal and _norm(refusal).rstrip(".") in reply:
        return True
    return reply.startswith(MARKERS)
