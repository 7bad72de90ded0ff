"""The registry of unlearning methods: a dict literal, one line of facts per method.

A method is a loss (a pure tensor function) plus what it needs; the training loop runs only those passes.
`teacher` names the in-context system that produces the teacher's logits: "oracle" gives each example its own
objective's intention prompt (the paper's training-time routing), "ensemble" joins all prompts (DUET w/ ET).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mule.config import MethodConfig
from mule.errors import unknown
from mule.losses import bidirectional_topk_loss, bild_loss, duet_loss, sft_loss


@dataclass(frozen=True)
class Method:
    summary: str
    paper: str
    loss: Callable
    teacher: str  # "oracle", "ensemble", or "none" for methods without a teacher
    params: tuple[str, ...]  # MethodConfig fields passed to the loss
    fixed: tuple[tuple[str, object], ...] = ()  # values this method pins (e.g. alpha = 0)
    needs: tuple[str, ...] = ("teacher_logits",)
    forget_target: str | None = None  # pins method.forget_target (SFT trains on refusal sentences)


METHODS: dict[str, Method] = {
    "bitopk": Method("Bidirectional top-K logit distillation from per-objective intention-prompted teachers (ours)",
                     "Zhong, Liu, Zhu 2026, arXiv 2604.15482, Eq. 3", bidirectional_topk_loss, "oracle",
                     ("k", "alpha", "beta")),
    "duet": Method("DUET with the ensemble teacher: teacher-top-K Smooth-L1 only, one joined prompt",
                   "Zhong, Yang, Zhu, ICLR 2026, arXiv 2601.21283", duet_loss, "ensemble", ("k", "beta")),
    "bitopk_duet_loss": Method("Ablation (Table 2): ours with DUET's loss (alpha = 0), per-objective teachers",
                               "arXiv 2604.15482, Table 2", duet_loss, "oracle", ("k", "beta")),
    "bitopk_bild_loss": Method("Ablation (Table 2): ours with BiLD's logit-difference loss",
                               "Li, Zhou, Song, COLING 2025, arXiv 2406.13555", bild_loss, "oracle", ("k", "tau")),
    "sft": Method("SFT refusal tuning: NLL on the refusal sentence for forget and prefilled queries, gold answers "
                  "for the rest", "METHOD_SPEC 4.4 (the paper's SFT baseline)", sft_loss, "none", (), needs=("labels",),
                  forget_target="refusal"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def bind_loss(config: MethodConfig) -> Callable:
    """The method's loss with its hyperparameters from the config: f(student, teacher, weights)."""
    method = get_method(config.name)
    return partial(method.loss, **{p: getattr(config, p) for p in method.params}, **dict(method.fixed))
