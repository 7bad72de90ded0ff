"""`mule gradsim`: how well the three objectives' gradients agree (the paper's Figure 2, METHOD_SPEC 6).

For each pair of objectives (i, j): cos(g_i, g_j) = <g_i, g_j> / (|g_i| |g_j|), where g_k is the gradient of
the bidirectional top-K distillation loss (METHOD_SPEC 3.1, the same loss for every objective, so only the data
differs) on one batch of objective k's data, with the objective's intention prompt in the teacher's context.
Measured over `batches` independent batches per objective at each checkpoint (step 0 and after a few optimiser
steps of joint training on L_1 + L_2 + L_3 of the same data), reported as mean and standard deviation.

Two data conditions (METHOD_SPEC 6.3):
    heterogeneous: Obj1 on raw passages (the benchmark's raw/forget.jsonl and raw/retain.jsonl, half and half),
        distilled on every token of the passage; the student sees the passage alone, the teacher sees p_1 as
        plain text followed by the passage. Obj2 on raw/neighbor.jsonl if the benchmark has it, else its
        neighbour QA; Obj3 on its adversarial (prefilled) QA: raw text cannot carry a prefilling attack.
    standardised: every objective on the benchmark's QA records of that objective, anchors included.

Gradients are taken over the selected parameters only (default: the last three decoder layers); everything else
has requires_grad off, so backward stops at the first selected layer. Each objective's gradient is kept as
flattened fp32 pieces, one per parameter (the same numbers as one concatenated vector without the copy), and
the objectives are computed one at a time.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mule.batching import TokenizedExample, position_weights
from mule.benchmark import Benchmark, load_benchmark
from mule.chat import ChatFormatter
from mule.config import ModelConfig, TeacherConfig
from mule.errors import MuleError
from mule.losses import bidirectional_topk_loss
from mule.modeling import ResponseLogits, causal_lm
from mule.models import load_model, load_tokenizer, pick_dtype
from mule.prompts import system_prompt
from mule.records import REFUSE_ROLES, QARecord
from mule.targets import response_targets
from mule.train import Context, student_logits, teacher_logits, tokenize

log = logging.getLogger(__name__)

CONDITIONS = ("heterogeneous", "standardised")
CONDITION_LABELS = {"heterogeneous": "heterogeneous (raw text, baseline)",
                    "standardised": "standardised QA + anchors (ours)"}
OBJECTIVES = (1, 2, 3)
PAIRS = ((1, 2), (1, 3), (2, 3))
RAW_SIDES = {"forget": 1, "retain": 1, "neighbor": 2}  # raw/<side>.jsonl -> the objective it feeds


# ---- config -------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    k: int = 10  # top-K of each index set (METHOD_SPEC 3.6)
    alpha: float = 1.0
    beta: float = 1.0


@dataclass
class GradsimTrainConfig:
    """The joint training between checkpoints: AdamW on L_1 + L_2 + L_3, one batch per objective a step."""

    lr: float = 1e-5
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    batch_size: int = 8  # examples per objective per step
    params: str = "all"  # all: every weight (ordinary training); selected: only the measured parameters


@dataclass
class GradsimConfig:
    benchmark: str = "hp"
    output_dir: str = "runs/gradsim"
    # fp32 by default, also on a GPU: AdamW steps of lr 1e-5 are mostly rounded away in bf16 weights
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="float32"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    forget_target: str = "teacher_generated"  # response of refuse-type QA records (METHOD_SPEC 3.3)
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    layers: list[str] = field(default_factory=lambda: ["last3"])  # each: lastN, A-B, A (0-based) or all
    checkpoints: list[int] = field(default_factory=lambda: [0, 10, 20, 50])  # optimiser steps
    batches: int = 10  # independent batches per objective at each checkpoint
    batch_size: int = 16  # examples per batch
    micro_batch_size: int | None = None  # split a batch for memory; the gradient is the same
    raw_max_tokens: int = 256  # raw passages are cut into windows of at most this many tokens
    seed: int = 42
    train: GradsimTrainConfig = field(default_factory=GradsimTrainConfig)


def check_config(config: GradsimConfig) -> None:
    """Fail before any model is loaded."""
    bad = [c for c in config.conditions if c not in CONDITIONS]
    if bad or not config.conditions:
        raise MuleError(f"conditions must be a non-empty list of {', '.join(CONDITIONS)}; got {config.conditions}")
    steps = config.checkpoints
    if not steps or any(s < 0 for s in steps) or sorted(set(steps)) != steps:
        raise MuleError(f"checkpoints must be increasing optimiser steps >= 0, e.g. [0, 10, 20]; got {steps}")
    for name, value, low in (("batches", config.batches, 1), ("batch_size", config.batch_size, 2),
                             ("train.batch_size", config.train.batch_size, 1), ("raw_max_tokens",
                             config.raw_max_tokens, 8), ("micro_batch_size", config.micro_batch_size or 1, 1)):
        if value < low:
            raise MuleError(f"{name} must be at least {low}, got {value}")
    if config.train.params not in ("all", "selected"):
        raise MuleError(f"train.params must be 'all' or 'selected', got {config.train.params!r}")
    if not config.layers:
        raise MuleError("layers must name at least one parameter selection, e.g. [last3]")
    for spec in config.layers:
        parse_layers(spec, None)


# ---- parameter selection ------------------------------------------------------------------------------

_LAYER_SPEC = re.compile(r"^(?:all|last(\d+)|(\d+)(?:-(\d+))?)$")


def parse_layers(spec: str, n_layers: int | None) -> list[int] | None:
    """Decoder-layer indices named by `spec` (None = the whole model); range-checked when n_layers is given.

    "all": every parameter; "lastN": the last N decoder layers; "A-B": layers A..B inclusive, 0-based; "A": one.
    """
    match = _LAYER_SPEC.match(str(spec).strip())
    if not match:
        raise MuleError(f"layers {spec!r}: expected 'all', 'lastN' (e.g. last3), 'A-B' (e.g. 25-27) or 'A'")
    if spec.strip() == "all":
        return None
    last, start, end = match.groups()
    if last is not None and int(last) < 1:
        raise MuleError(f"layers {spec!r}: lastN needs N >= 1")
    if start is not None and end is not None and int(end) < int(start):
        raise MuleError(f"layers {spec!r}: the range ends before it starts")
    if n_layers is None:
        return []
    if last is not None:
        if int(last) > n_layers:
            raise MuleError(f"layers {spec!r}: the model has only {n_layers} decoder layers")
        return list(range(n_layers - int(last), n_layers))
    first, final = int(start), int(end if end is not None else start)
    if final >= n_layers:
        raise MuleError(f"layers {spec!r}: the model has {n_layers} decoder layers, numbered 0-{n_layers - 1}")
    return list(range(first, final + 1))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(causal_lm(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MuleError(f"cannot find the decoder layers of {type(model).__name__} (expected get_decoder().layers); "
                        "use layers=[all]")
    return layers


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every weight in the decoder layers named by `spec`, in model order.

    A layer range takes everything inside those blocks (attention, MLP, both norms) and nothing else: no
    embeddings, final norm or LM head (METHOD_SPEC 6.1). "all" takes every parameter (tied ones once).
    """
    named = list(model.named_parameters())
    if str(spec).strip() == "all":
        return named
    layers = decoder_layers(model)
    wanted = {id(p) for i in parse_layers(spec, len(layers)) for p in layers[i].parameters()}
    return [(n, p) for n, p in named if id(p) in wanted]


def describe_scope(model: torch.nn.Module, spec: str) -> str:
    indices = parse_layers(spec, len(decoder_layers(model))) if spec.strip() != "all" else None
    if indices is None:
        return "the whole model"
    span = f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else f"{indices[0]}"
    return f"decoder layers {span} of {len(decoder_layers(model))}"


# ---- gradients and cosines ----------------------------------------------------------------------------


def grad_pieces(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's .grad flattened in fp32 (zeros where it got none); the .grad fields are cleared."""
    pieces = []
    for p in params:
        pieces.append(torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if p.grad is None
                      else p.grad.detach().float().reshape(-1))
        p.grad = None
    return pieces


def inner(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """<a, b> of two gradients given as matching lists of flat pieces, summed in float64."""
    return math.fsum(float(torch.dot(x, y)) for x, y in zip(a, b, strict=True))


def cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """cos(a, b); NaN when either gradient is zero."""
    norm = math.sqrt(inner(a, a) * inner(b, b))
    return inner(a, b) / norm if norm > 0 else float("nan")


# ---- raw passages and data pools ----------------------------------------------------------------------


@dataclass(frozen=True)
class RawPassage:
    id: str
    text: str
    title: str | None = None
    source: str | None = None


def read_raw(path: Path) -> list[RawPassage]:
    """raw/<side>.jsonl: one passage a line, {"id", "text", optional "title", "source"}; errors name file:line."""
    passages, seen = [], set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MuleError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in ("id", "text")):
            raise MuleError(f"{path}:{lineno}: a raw passage needs non-empty string fields 'id' and 'text'")
        if row["id"] in seen:
            raise MuleError(f"{path}:{lineno}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        passages.append(RawPassage(row["id"], row["text"].strip(), row.get("title"), row.get("source")))
    if not passages:
        raise MuleError(f"{path}: no passages (the file is empty)")
    return passages


def load_raw(root: Path) -> dict[str, list[RawPassage]]:
    """The benchmark's raw passages per side, for the sides whose file exists."""
    return {side: read_raw(root / "raw" / f"{side}.jsonl") for side in RAW_SIDES
            if (root / "raw" / f"{side}.jsonl").is_file()}


@dataclass(frozen=True)
class Item:
    """One example of a pool: a QA record (tokenised once its response target is known) or a raw window."""

    objective: int
    side: str  # refuse | answer: Obj1 batches take half of each
    unit: str  # anchor pair id, or the item's own id: a unit is never split across batches
    record: QARecord | None = None
    example: TokenizedExample | None = None

    @property
    def id(self) -> str:
        return self.record.id if self.record is not None else self.example.id


def raw_items(passages: list[RawPassage], side: str, tokenizer, window: int) -> list[Item]:
    """Each passage cut into the fewest near-equal windows of at most `window` predicted tokens (no short tail
    window); each window's first token is context only, the student predicts every other one."""
    objective, items = RAW_SIDES[side], []
    for passage in passages:
        ids = tokenizer(passage.text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        size = math.ceil((len(ids) - 1) / math.ceil((len(ids) - 1) / window))
        for w, start in enumerate(range(0, len(ids) - 1, size)):
            chunk = ids[start : start + size + 1]
            example = TokenizedExample(f"{passage.id}#{w}", objective, chunk[:1], chunk[1:])
            items.append(Item(objective, "refuse" if side == "forget" else "answer", example.id, example=example))
    return items


def qa_items(records: list[QARecord]) -> list[Item]:
    return [Item(r.objective, "refuse" if r.role in REFUSE_ROLES else "answer", r.anchor_pair_id or r.id, record=r)
            for r in records]


def build_pools(bench: Benchmark, conditions: list[str], tokenizer, window: int) -> tuple[dict, dict]:
    """{(condition, objective): items} and {(condition, objective): a line saying what the data is}."""
    records = bench.train()
    pools, about = {}, {}
    if "standardised" in conditions:
        for k in OBJECTIVES:
            recs = [r for r in records if r.objective == k]
            pools["standardised", k] = qa_items(recs)
            roles = sorted({r.role for r in recs})
            about["standardised", k] = f"QA records of objective {k} ({len(recs)}: {', '.join(roles)})"
    if "heterogeneous" in conditions:
        raw = load_raw(bench.root)
        missing = [s for s in ("forget", "retain") if s not in raw]
        if missing:
            raise MuleError(f"the heterogeneous condition needs raw passages: {bench.root / 'raw'} has no "
                            f"{', '.join(s + '.jsonl' for s in missing)} (see the bundled hp benchmark's README), "
                            "or run conditions=[standardised]")
        for k, role in ((1, None), (2, "neighbor"), (3, "adversarial")):
            sides = [s for s in raw if RAW_SIDES[s] == k]
            if sides:
                pools["heterogeneous", k] = [i for s in sides for i in raw_items(raw[s], s, tokenizer, window)]
                about["heterogeneous", k] = "raw passages: " + " + ".join(
                    f"{len(raw[s])} {s} (raw/{s}.jsonl)" for s in sides) + f", windows of <= {window} tokens"
            else:
                recs = [r for r in records if r.objective == k and r.role == role]
                pools["heterogeneous", k] = qa_items(recs)
                about["heterogeneous", k] = f"QA records, role {role} ({len(recs)}), no anchors"
    empty = [key for key, items in pools.items() if not items]
    if empty:
        raise MuleError(f"no training data for {', '.join(f'{c} objective {k}' for c, k in empty)} in {bench.root}")
    return pools, about


# ---- batches ------------------------------------------------------------------------------------------


class UnitSampler:
    """Batches of whole units drawn without replacement; a fresh shuffle of the pool when it runs out.

    With `balance` (Obj1: D_f and D_r half and half, METHOD_SPEC 6.2), at most half of a batch is refuse-side.
    """

    def __init__(self, items: list[Item], rng: random.Random, balance: bool):
        units: dict[str, list[Item]] = {}
        for item in items:
            units.setdefault(item.unit, []).append(item)
        self.units, self.rng, self.balance = list(units.values()), rng, balance
        self.queue: list[list[Item]] = []

    def _fits(self, unit: list[Item], batch: list[Item], size: int) -> bool:
        if len(batch) + len(unit) > size:
            return False
        if not self.balance:
            return True
        return all(sum(i.side == side for i in batch + unit) <= (size + 1) // 2 for side in ("refuse", "answer"))

    def draw(self, size: int) -> list[Item]:
        batch: list[Item] = []
        for refill in (False, True):
            if refill:
                taken = {id(u[0]) for u in self.queue}
                used = {i.unit for i in batch}
                fresh = [u for u in self.units if id(u[0]) not in taken and u[0].unit not in used]
                self.rng.shuffle(fresh)
                self.queue += fresh
            rest = []
            for unit in self.queue:
                if self._fits(unit, batch, size):
                    batch += unit
                else:
                    rest.append(unit)
            self.queue = rest
            if len(batch) == size:
                break
        return batch


def draw_plan(pools: dict, config: GradsimConfig) -> dict:
    """Every batch of the run, drawn up front (so only the QA records used get teacher targets).

    plan[condition] = {"train": [{objective: items} per step], "measure": {step: [{objective: items}] x batches}}
    """
    plan = {}
    for condition in config.conditions:
        samplers = {}
        for purpose in ("train", "measure"):
            for k in OBJECTIVES:
                rng = random.Random(f"{config.seed}-{condition}-{k}-{purpose}")
                sides = {i.side for i in pools[condition, k]}
                samplers[purpose, k] = UnitSampler(pools[condition, k], rng, balance=k == 1 and len(sides) == 2)
        steps = config.checkpoints[-1]
        plan[condition] = {
            "train": [{k: samplers["train", k].draw(config.train.batch_size) for k in OBJECTIVES} for _ in range(steps)],
            "measure": {s: [{k: samplers["measure", k].draw(config.batch_size) for k in OBJECTIVES}
                            for _ in range(config.batches)] for s in config.checkpoints},
        }
    return plan


def plan_records(plan: dict) -> list[QARecord]:
    seen: dict[str, QARecord] = {}
    for by_condition in plan.values():
        groups = by_condition["train"] + [g for gs in by_condition["measure"].values() for g in gs]
        for group in groups:
            for items in group.values():
                for item in items:
                    if item.record is not None:
                        seen.setdefault(item.record.id, item.record)
    return list(seen.values())


# ---- contexts: what the student and the teacher see ---------------------------------------------------


def make_contexts(config: GradsimConfig, pools: dict, formatter: ChatFormatter, student, teacher, systems: dict,
                  device) -> dict:
    """One train.Context per (condition, objective), sharing the teacher's prompt keys/values.

    QA: the student sees the chat template's default system part, the teacher the objective's intention prompt
    as its system message. Raw text: the student sees the passage alone, the teacher the intention prompt as
    plain text, a blank line, then the passage (METHOD_SPEC 6.3a).
    """
    wrapper = ResponseLogits(student)
    cache: dict = {}
    contexts = {}
    for (condition, k), items in pools.items():
        raw = items[0].record is None
        key = ("raw", k) if raw else systems[k]
        if raw:
            prefix = formatter.tokenizer(systems[k] + "\n\n", add_special_tokens=False)["input_ids"]
        else:
            prefix = formatter.prefix_ids(systems[k])
        student_prefix = [] if raw else formatter.prefix_ids(None)
        if config.teacher.cache_prefix and key not in cache:  # the teacher is frozen: its prompt's K/V never change
            with torch.no_grad():
                cache[key] = teacher(torch.tensor([prefix], device=device), None, None, None)
        contexts[condition, k] = Context(
            wrapper=wrapper, student=student, teacher=teacher,
            student_prefix=torch.tensor(student_prefix, dtype=torch.long), teacher_prefix={key: prefix},
            teacher_cache=cache if config.teacher.cache_prefix else {}, systems={k: key})
    return contexts


def check_raw_length(config: GradsimConfig, formatter: ChatFormatter, systems: dict, pools: dict) -> None:
    for (_, k), items in pools.items():
        if items[0].record is None:
            prompt = len(formatter.tokenizer(systems[k] + "\n\n", add_special_tokens=False)["input_ids"])
            if prompt + config.raw_max_tokens + 1 > config.model.max_length:
                raise MuleError(f"raw_max_tokens={config.raw_max_tokens} + the teacher prompt ({prompt} tokens) "
                                f"exceed model.max_length={config.model.max_length}; lower raw_max_tokens")


# ---- losses, training, measurement --------------------------------------------------------------------


def backward_loss(ctx: Context, examples: list[TokenizedExample], pad_id: int, device, config: GradsimConfig,
                  scale: float = 1.0) -> float:
    """Backward of the batch's bidirectional top-K loss (mean over examples), micro-batch by micro-batch."""
    size = config.micro_batch_size or len(examples)
    total = 0.0
    for start in range(0, len(examples), size):
        micro = examples[start : start + size]
        batch, zs = student_logits(ctx, micro, pad_id, device)  # (N, V)
        zr = teacher_logits(ctx, micro, pad_id, device)  # (N, V)
        weights = position_weights(batch, len(examples))  # mean over tokens, then over the whole batch
        loss, _ = bidirectional_topk_loss(zs, zr, weights, k=config.loss.k, alpha=config.loss.alpha,
                                          beta=config.loss.beta)
        (loss * scale).backward()
        total += float(loss.detach())
    return total


def set_trainable(model: torch.nn.Module, params: Sequence[torch.nn.Parameter] | None) -> None:
    """requires_grad on `params` only (None: on every parameter)."""
    model.requires_grad_(params is None)
    for p in params or ():
        p.requires_grad_(True)


def train_step(contexts: dict, condition: str, group: dict, tokens: dict, optimizer, trainable: list,
               pad_id: int, device, config: GradsimConfig) -> float:
    """One AdamW step on L_1 + L_2 + L_3 (equal weights), each objective on its own batch."""
    optimizer.zero_grad(set_to_none=True)
    total = sum(backward_loss(contexts[condition, k], [tokens[i.id] for i in group[k]], pad_id, device, config)
                for k in OBJECTIVES)
    norm = torch.nn.utils.clip_grad_norm_(trainable, config.train.max_grad_norm)
    if not (math.isfinite(total) and math.isfinite(float(norm))):
        raise MuleError(f"non-finite loss or gradient in the {condition} training steps; lower train.lr")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def measure(contexts: dict, condition: str, group: dict, tokens: dict, union: list, scopes: dict, pad_id: int,
            device, config: GradsimConfig) -> tuple[dict, dict, dict]:
    """Per scope: the pair cosines of one batch per objective, and each objective's gradient pieces and loss."""
    grads, losses = {}, {}
    for k in OBJECTIVES:  # one objective at a time; only its flat fp32 pieces are kept
        losses[k] = backward_loss(contexts[condition, k], [tokens[i.id] for i in group[k]], pad_id, device, config)
        grads[k] = grad_pieces(union)
    cos = {}
    for name, index in scopes.items():
        picked = {k: [grads[k][i] for i in index] for k in OBJECTIVES}
        cos[name] = {f"{i}-{j}": cosine(picked[i], picked[j]) for i, j in PAIRS}
        cos[name].update({f"norm{k}": math.sqrt(inner(picked[k], picked[k])) for k in OBJECTIVES})
    return cos, grads, losses


def within(previous: dict, grads: dict, scopes: dict) -> dict:
    """cos between this batch's and the previous batch's gradient of the same objective (the noise ceiling)."""
    return {name: {str(k): cosine([previous[k][i] for i in index], [grads[k][i] for i in index])
                   for k in OBJECTIVES} for name, index in scopes.items()}


# ---- statistics and outputs ---------------------------------------------------------------------------


def summarise(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else None,
            "n": len(finite), "values": [round(v, 6) for v in values]}


def collect(records: list[dict], key: str) -> dict:
    """{"mean", "std", "n", "by_step": {step: summary}} of records [{"step", key: value}]."""
    out = summarise([r[key] for r in records])
    del out["values"]
    steps = sorted({r["step"] for r in records})
    out["by_step"] = {str(s): summarise([r[key] for r in records if r["step"] == s]) for s in steps}
    return out


def condition_summary(rows: list[dict], within_rows: list[dict], scopes: dict) -> dict:
    out = {}
    for name in scopes:
        mine = [{"step": r["step"], **r["cos"][name]} for r in rows]
        same = [{"step": r["step"], **r["cos"][name]} for r in within_rows]
        out[name] = {"pairs": {f"{i}-{j}": collect(mine, f"{i}-{j}") for i, j in PAIRS},
                     "within": {str(k): collect(same, str(k)) for k in OBJECTIVES} if same else {},
                     "grad_norm": {str(k): collect(mine, f"norm{k}")["mean"] for k in OBJECTIVES}}
    return out


def _cell(stat: dict | None, decimals: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{decimals}f} ± {stat['std']:.{decimals}f}"


def pair_label(pair: str) -> str:
    i, j = pair.split("-")
    return f"Obj{i}–Obj{j}"


def gradsim_markdown(result: dict) -> str:
    """gradsim.md: the main table (mean ± std per pair and condition), per-step and within-objective tables."""
    conditions = list(result["conditions"])
    cfg = result["config"]
    lines = ["# Gradient cosine similarity between objectives\n",
             f"- model: `{result['model']}`; benchmark: `{result['benchmark']}`; device: {result['device']}",
             f"- loss: bidirectional top-K logit distillation (k={cfg['loss']['k']}, alpha={cfg['loss']['alpha']}, "
             f"beta={cfg['loss']['beta']}) for every objective, with its intention prompt in the teacher's context",
             f"- {cfg['batches']} batches of {cfg['batch_size']} examples per objective at steps "
             f"{', '.join(map(str, cfg['checkpoints']))} of joint training (AdamW lr {cfg['train']['lr']}, "
             f"{cfg['train']['batch_size']} examples per objective a step, {cfg['train']['params']} weights trained)",
             f"- wall time: {result['seconds']:.0f} s\n"]
    for name, scope in result["scopes"].items():
        lines.append(f"## Parameters `{name}`: {scope['description']} ({scope['numel']:,} weights)\n")
        lines.append("| pair | " + " | ".join(CONDITION_LABELS[c] for c in conditions) + " |")
        lines.append("|---|" + "---|" * len(conditions))
        for i, j in PAIRS:
            cells = [_cell(result["conditions"][c]["scopes"][name]["pairs"][f"{i}-{j}"]) for c in conditions]
            lines.append(f"| {pair_label(f'{i}-{j}')} | " + " | ".join(cells) + " |")
        lines.append("\nMean ± standard deviation over batches and steps. Per step:\n")
        steps = [str(s) for s in cfg["checkpoints"]]
        lines.append("| pair | condition | " + " | ".join(f"step {s}" for s in steps) + " |")
        lines.append("|---|---|" + "---|" * len(steps))
        for i, j in PAIRS:
            for c in conditions:
                by_step = result["conditions"][c]["scopes"][name]["pairs"][f"{i}-{j}"]["by_step"]
                lines.append(f"| {pair_label(f'{i}-{j}')} | {c} | " + " | ".join(_cell(by_step.get(s)) for s in steps)
                             + " |")
        lines.append("\nSame objective, two consecutive batches (how far batch noise alone lowers the cosine), "
                     "and mean gradient norm:\n")
        lines.append("| objective | " + " | ".join(f"{c}: cos | {c}: norm" for c in conditions) + " |")
        lines.append("|---|" + "---|---|" * len(conditions))
        for k in OBJECTIVES:
            cells = []
            for c in conditions:
                data = result["conditions"][c]["scopes"][name]
                cells += [_cell(data["within"].get(str(k))), f"{data['grad_norm'][str(k)]:.3g}"]
            lines.append(f"| Obj{k} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("## Data\n")
    for c in conditions:
        for k in OBJECTIVES:
            lines.append(f"- {c}, Obj{k}: {result['conditions'][c]['data'][str(k)]}")
    lines.append("\n![Gradient cosine similarity per pair of objectives](gradsim.png)\n")
    return "\n".join(lines)


def gradsim_figure(result: dict) -> Any:
    """Grouped bars like the paper's Figure 2: one group per pair, one bar per condition, std as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported here: matplotlib is slow to load
    from matplotlib.figure import Figure

    conditions, scopes = list(result["conditions"]), list(result["scopes"])
    fig = Figure(figsize=(4.2 * len(scopes) + 1, 3.6))
    FigureCanvasAgg(fig)
    width = 0.8 / len(conditions)
    for s, name in enumerate(scopes):
        ax = fig.add_subplot(1, len(scopes), s + 1)
        for c, condition in enumerate(conditions):
            stats = [result["conditions"][condition]["scopes"][name]["pairs"][f"{i}-{j}"] for i, j in PAIRS]
            means = [st["mean"] if st["mean"] is not None else math.nan for st in stats]
            errors = [st["std"] or 0.0 for st in stats]
            xs = [p + (c - (len(conditions) - 1) / 2) * width for p in range(len(PAIRS))]
            bars = ax.bar(xs, means, width, yerr=errors, capsize=3, label=CONDITION_LABELS[condition])
            ax.bar_label(bars, labels=[f"{m:.2f}" for m in means], fontsize=7, padding=2)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(PAIRS)))
        ax.set_xticklabels([pair_label(f"{i}-{j}") for i, j in PAIRS])
        ax.set_ylabel("gradient cosine similarity")
        ax.set_title(f"{result['scopes'][name]['description']}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Objective gradient alignment: {model_label(result['model'])}", fontsize=10)
    fig.tight_layout()
    return fig


def model_label(name: str) -> str:
    """A hub id as it is; a folder by its last two parts (prepared models all end in /model)."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if len(parts) > 2 or name.startswith(("/", "~", ".")) else name


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"gradsim.json": out / "gradsim.json", "gradsim.md": out / "gradsim.md", "gradsim.png": out / "gradsim.png"}
    for name, text in (("gradsim.json", json.dumps(result, indent=2) + "\n"), ("gradsim.md", gradsim_markdown(result))):
        tmp = files[name].with_name(name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(files[name])
    tmp = out / "gradsim.png.tmp"
    gradsim_figure(result).savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    tmp.replace(files["gradsim.png"])
    return files


# ---- the command --------------------------------------------------------------------------------------


def prepare(config: GradsimConfig, device) -> dict:
    """Load the benchmark, tokenizer and model; select parameters; draw every batch; tokenise."""
    bench = load_benchmark(config.benchmark)
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    pools, about = build_pools(bench, config.conditions, tokenizer, config.raw_max_tokens)
    model = load_model(config.model.name, pick_dtype(config.model.dtype, device),
                       config.model.trust_remote_code).to(device)
    named = {spec: select_parameters(model, spec) for spec in config.layers}
    formatter = ChatFormatter(tokenizer)
    systems = {k: system_prompt("oracle", k, bench.domain, config.teacher.prompts, config.teacher.cot,
                                config.teacher.prompt_set) for k in OBJECTIVES}
    check_raw_length(config, formatter, systems, pools)
    plan = draw_plan(pools, config)
    records = plan_records(plan)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    targets, share = response_targets(records, systems, formatter, model, out / "teacher_targets.jsonl",
                                      config.model.name, config.forget_target, config.teacher.max_new_tokens,
                                      config.teacher.generation_batch_size, bench.domain.refusal)
    prefix_len = {k: max(len(formatter.prefix_ids(None)), len(formatter.prefix_ids(s))) for k, s in systems.items()}
    tokens = {e.id: e for e in tokenize(records, targets, formatter, prefix_len, config)}
    tokens.update({i.id: i.example for items in pools.values() for i in items if i.example is not None})
    return {"bench": bench, "tokenizer": tokenizer, "model": model, "named": named, "formatter": formatter,
            "systems": systems, "pools": pools, "about": about, "plan": plan, "tokens": tokens,
            "refusal_share": share}


def run_condition(condition: str, s: dict, contexts: dict, union: list, scopes: dict, config: GradsimConfig,
                  device, bar) -> dict:
    """Joint training from theta_0 up to each checkpoint, measuring there; returns the condition's summary."""
    model, plan, pad_id = s["model"], s["plan"][condition], s["tokenizer"].pad_token_id
    trainable = list(model.parameters()) if config.train.params == "all" else union
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                  betas=(0.9, 0.999))
    rows, within_rows, train_loss, losses, step = [], [], [], {k: [] for k in OBJECTIVES}, 0
    for checkpoint in config.checkpoints:
        set_trainable(model, None if config.train.params == "all" else union)
        while step < checkpoint:
            train_loss.append(train_step(contexts, condition, plan["train"][step], s["tokens"], optimizer, trainable,
                                         pad_id, device, config))
            step += 1
            bar.set_postfix(step=step, loss=f"{train_loss[-1]:.3f}")
            bar.update(1)
        set_trainable(model, union)  # measurement: gradients of the selected parameters only
        previous = None
        for group in plan["measure"][checkpoint]:
            cos, grads, loss = measure(contexts, condition, group, s["tokens"], union, scopes, pad_id, device, config)
            rows.append({"step": checkpoint, "cos": cos})
            if previous is not None:
                within_rows.append({"step": checkpoint, "cos": within(previous, grads, scopes)})
            previous = grads
            for k in OBJECTIVES:
                losses[k].append(loss[k])
            bar.set_postfix(step=checkpoint, **{f"cos{p}": f"{v:.2f}" for p, v in cos[next(iter(scopes))].items()
                                                if "-" in p})
            bar.update(len(OBJECTIVES))
    return {"scopes": condition_summary(rows, within_rows, scopes), "loss": {str(k): statistics.fmean(v)
            for k, v in losses.items()}, "train_loss": [round(v, 6) for v in train_loss]}


def run_gradsim(config: GradsimConfig) -> dict[str, Path]:
    """Measure, then write gradsim.json, gradsim.md and gradsim.png into config.output_dir."""
    check_config(config)
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = prepare(config, device)
    model = s["model"]
    union_named = {id(p): (n, p) for spec in config.layers for n, p in s["named"][spec]}
    union = [p for _, p in union_named.values()]
    position = {id(p): i for i, p in enumerate(union)}
    scopes = {spec: [position[id(p)] for _, p in s["named"][spec]] for spec in config.layers}
    # the teacher stays at theta_0: a frozen copy when the student trains, else the student itself (under no_grad)
    trains = config.checkpoints[-1] > 0
    teacher = ResponseLogits(copy.deepcopy(model).requires_grad_(False) if trains else model).eval()
    contexts = make_contexts(config, s["pools"], s["formatter"], model, teacher, s["systems"], device)
    total = len(config.conditions) * (config.checkpoints[-1] + len(config.checkpoints) * config.batches * 3)
    results = {}
    with tqdm(total=total, desc="gradsim", unit="pass") as bar:
        for n, condition in enumerate(config.conditions):
            if n and trains:
                model.load_state_dict(teacher.model.state_dict())  # every condition trains from theta_0
            bar.set_description(f"gradsim [{condition}]")
            results[condition] = run_condition(condition, s, contexts, union, scopes, config, device, bar)
            results[condition]["data"] = {str(k): s["about"][condition, k] for k in OBJECTIVES}
    result = {"model": config.model.name, "benchmark": config.benchmark, "device": describe_device(device),
              "seconds": round(time.time() - started, 1), "teacher_target_refusal_share": s["refusal_share"],
              "config": asdict(config), "scopes": {spec: {"description": describe_scope(model, spec),
              "parameters": len(s["named"][spec]), "numel": sum(p.numel() for _, p in s["named"][spec])}
              for spec in config.layers}, "conditions": results}
    return write_outputs(result, Path(config.output_dir))


def describe_device(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
