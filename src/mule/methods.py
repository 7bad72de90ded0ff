"""The registry of unlearning methods: a dict literal, one entry of facts per method.

A method is a loss (a pure tensor function) or a gradient-combination strategy, plus what it needs; the
training loop runs only those passes (see NEEDS). `teacher` names the in-context system that produces the
teacher's logits: "oracle" gives each example its own objective's intention prompt (the paper's training-time
routing), "ensemble" joins all prompts (DUET w/ ET), "none" for methods without a teacher.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from mule.config import MethodConfig
from mule.errors import MuleError, unknown
from mule.losses import (
    bidirectional_topk_loss,
    bild_loss,
    duet_loss,
    flat_loss,
    ga_loss,
    graddiff_loss,
    mollm_loss,
    npo_loss,
    rmu_loss,
    sft_loss,
    simnpo_loss,
)
from mule.losses.flat import DIVERGENCES

# What a method can need, and what the training loop does for it.
NEEDS = {
    "teacher_logits": "a teacher forward on the intention-prompted context (base weights, adapter disabled)",
    "labels": "the response tokens as targets",
    "reference_logprobs": "a base-model forward on the student's own context: log-probs of the labels",
    "refusal_labels": "a refusal template as a second response of each example, in the same student pass",
    "hidden_states": "the student's hidden states after decoder layer method.layer, in place of logits",
    "reference_hidden_states": "a base-model forward on the retain-type examples: their hidden states",
    "per_objective_gradients": "one backward per objective; the gradients are kept and combined",
}
BASE_PASSES = ("teacher_logits", "reference_logprobs", "reference_hidden_states")  # run the frozen base model
COMBINE = ("ngdiff", "mgda", "projection")


@dataclass(frozen=True)
class Method:
    summary: str
    paper: str
    loss: Callable
    teacher: str  # "oracle", "ensemble", or "none" for methods without a teacher
    params: tuple = ()  # MethodConfig fields passed to the loss: "name", or ("config field", "loss keyword")
    fixed: tuple[tuple[str, object], ...] = ()  # values this method pins (e.g. alpha = 0)
    needs: tuple[str, ...] = ("teacher_logits",)
    forget_target: str | None = None  # pins method.forget_target (SFT: refusals; likelihood baselines: gold)
    objectives: tuple[int, ...] = (1, 2, 3)  # default of method.objectives (the paper's * rows: Obj1 only)
    data: str = "all"  # "forget": forget-type records only (forget, adversarial, positive anchors)
    mean_over: str = "batch"  # the reduction's groups: "batch", "role" (forget-/retain-type), "objective"
    combine: str | None = None  # gradient combination over the objectives: ngdiff, mgda or projection
    optimizer: str = "adamw"  # or "sgd": theta <- theta - lr * direction, no momentum or weight decay
    defaults: tuple[tuple[str, object], ...] = ()  # values of MethodConfig fields left at None


GOLD = "gold_answer"
METHODS: dict[str, Method] = {
    "bitopk": Method("Bidirectional top-K logit distillation from per-objective intention-prompted teachers (ours)",
                     "Zhong, Liu, Zhu 2026, arXiv 2604.15482, Eq. 3", bidirectional_topk_loss, "oracle",
                     ("k", "alpha", "beta", "center")),
    "duet": Method("DUET with the ensemble teacher: teacher-top-K Smooth-L1 only, one joined prompt",
                   "Zhong, Yang, Zhu, ICLR 2026, arXiv 2601.21283", duet_loss, "ensemble", ("k", "beta", "center")),
    "bitopk_duet_loss": Method("Ablation (Table 2): ours with DUET's loss (alpha = 0), per-objective teachers",
                               "arXiv 2604.15482, Table 2", duet_loss, "oracle", ("k", "beta", "center")),
    "bitopk_bild_loss": Method("Ablation (Table 2): ours with BiLD's logit-difference loss",
                               "Li, Zhou, Song, COLING 2025, arXiv 2406.13555", bild_loss, "oracle", ("k", "tau")),
    "sft": Method("SFT refusal tuning: NLL on refusal templates for forget and prefilled queries, gold answers "
                  "for the rest", "METHOD_SPEC 4.4 (the paper's SFT baseline)", sft_loss, "none", (), needs=("labels",),
                  forget_target="refusal"),
    "ga": Method("Gradient ascent on the forget answers", "Jang et al., ACL 2023, arXiv 2210.01504", ga_loss, "none",
                 needs=("labels",), forget_target=GOLD, objectives=(1,), data="forget"),
    "graddiff": Method("Gradient difference: ascent on forget answers, descent on retain answers",
                       "Liu, Liu, Stone, CoLLAs 2022, arXiv 2203.12817 (TOFU's Grad. Diff.)", graddiff_loss, "none",
                       ("retain_weight",), needs=("labels",), forget_target=GOLD, mean_over="role",
                       defaults=(("retain_weight", 1.0),)),
    "npo": Method("Negative preference optimisation against the adapter-disabled base, plus retain NLL",
                  "Zhang, Lin, Bai, Mei, COLM 2024, arXiv 2404.05868", npo_loss, "none",
                  (("npo_beta", "beta"), "retain_weight"), needs=("labels", "reference_logprobs"), forget_target=GOLD,
                  mean_over="role", defaults=(("npo_beta", 0.1), ("retain_weight", 1.0))),
    "simnpo": Method("SimNPO: reference-free, length-normalised NPO with a margin, plus retain NLL",
                     "Fan et al. 2025, arXiv 2410.07163", simnpo_loss, "none",
                     (("npo_beta", "beta"), "gamma", "retain_weight"), needs=("labels",), forget_target=GOLD,
                     objectives=(1,), mean_over="role", defaults=(("npo_beta", 0.7), ("retain_weight", 0.1))),
    "flat": Method("FLAT: f-divergence between refusal templates and forget answers, forget data only",
                   "Wang et al., ICLR 2025, arXiv 2410.11143", flat_loss, "none", ("divergence",),
                   needs=("labels", "refusal_labels"), forget_target=GOLD, objectives=(1,), data="forget"),
    "ngdiff": Method("NGDiff: sum of the objectives' unit gradients (forget ones ascended), GeN adaptive LR",
                     "Jin et al., NAACL 2025, arXiv 2410.22086", graddiff_loss, "none", fixed=(("retain_weight", 1.0),),
                     needs=("labels", "per_objective_gradients"), forget_target=GOLD, mean_over="objective",
                     combine="ngdiff", optimizer="sgd"),
    "mollm": Method("MOLLM: unlearning cross-entropy + min-norm common descent direction over the objectives",
                    "Pan et al., ICASSP 2025, arXiv 2412.20412", mollm_loss, "none",
                    needs=("labels", "per_objective_gradients"), forget_target=GOLD, mean_over="objective",
                    combine="mgda"),
    "mollm_proj": Method("MOLLM, projection variant: the unlearning gradient projected off the retain gradients",
                         "Pan et al., ICASSP 2025, arXiv 2412.20412 (METHOD_SPEC 4.6 variant)", mollm_loss, "none",
                         needs=("labels", "per_objective_gradients"), forget_target=GOLD, mean_over="objective",
                         combine="projection"),
    "rmu": Method("RMU: steer forget activations at one layer to a random vector, keep retain activations",
                  "Li et al., ICML 2024 (WMDP), arXiv 2403.03218", rmu_loss, "none", ("retain_weight",),
                  needs=("hidden_states", "reference_hidden_states"), forget_target=GOLD, mean_over="role",
                  defaults=(("retain_weight", 1200.0),)),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown("method", name, METHODS)
    return METHODS[name]


def resolve(config: MethodConfig) -> MethodConfig:
    """The config with the method's defaults in place of None and its pinned forget_target; validated."""
    method = get_method(config.name)
    values = {field: value for field, value in method.defaults if getattr(config, field) is None}
    if config.objectives is None:
        values["objectives"] = list(method.objectives)
    if method.forget_target:
        values["forget_target"] = method.forget_target
    out = dataclasses.replace(config, **values)
    if not out.objectives or any(k not in (1, 2, 3) for k in out.objectives):
        raise MuleError(f"method.objectives must be a non-empty list of 1, 2, 3; got {out.objectives}")
    if out.divergence not in DIVERGENCES:
        raise unknown("method.divergence", out.divergence, DIVERGENCES)
    if out.layer < 0 or out.auto_lr_every < 1:
        raise MuleError("method.layer must be >= 0 and method.auto_lr_every >= 1")
    return out


def bind_loss(config: MethodConfig) -> Callable:
    """The method's loss with its hyperparameters from the config: f(**inputs) -> (loss, metrics).

    `inputs` are the tensors the loop computed (see `mule.losses`); the loss receives those its signature names.
    """
    method = get_method(config.name)
    config = resolve(config)
    hyper = {}
    for p in method.params:
        field, keyword = (p, p) if isinstance(p, str) else p
        hyper[keyword] = getattr(config, field)
    hyper.update(dict(method.fixed))
    accepted = set(inspect.signature(method.loss).parameters) - set(hyper)

    def loss(**inputs):
        return method.loss(**{k: v for k, v in inputs.items() if k in accepted}, **hyper)

    return loss
