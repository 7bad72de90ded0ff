"""`mule unlearn`: one explicit training loop for every method.

Per optimiser step the loop runs only the passes the method needs (`mule.methods.NEEDS`): the student forward +
backward on its own context (logits at response positions, or hidden states for RMU); for distillation one
teacher forward on the intention-prompted context; for NPO/RMU one reference forward on the student's context.
The teacher and the reference are the same base weights with the LoRA adapter disabled, or a frozen copy under
full fine-tuning. NGDiff and MOLLM run one backward per objective, keep each objective's gradient as one flat
vector and step along their combination.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mule.batching import (
    TokenizedExample,
    collate,
    length_grouped_batches,
    position_weights,
    split_micro,
    stratified_batches,
)
from mule.benchmark import load_benchmark
from mule.chat import ChatFormatter
from mule.config import UnlearnConfig
from mule.errors import MuleError
from mule.losses.mgda import common_descent
from mule.losses.ngdiff import fit_parabola, normalized_sum, update_lr
from mule.losses.projection import project_out
from mule.losses.rmu import control_vector
from mule.losses.tokens import token_logprobs
from mule.methods import BASE_PASSES, Method, bind_loss, get_method, resolve
from mule.modeling import ResponseLogits, causal_lm, half_precision_lora
from mule.models import load_model, load_tokenizer, pick_dtype
from mule.prompts import system_prompt
from mule.records import REFUSE_ROLES, QARecord
from mule.refusal import is_refusal
from mule.rundir import (
    finish_run,
    load_checkpoint,
    open_run_dir,
    save_checkpoint,
    save_weights,
)
from mule.targets import needs_generation, pick_refusal, refusal_templates, response_targets

log = logging.getLogger(__name__)

# The objectives whose gradients NGDiff and MOLLM combine (METHOD_SPEC 4.5, 4.6), in a fixed order.
OBJECTIVE_GROUPS = ("retain", "neighbor", "forget", "adversarial")
DESCENT_GROUPS = ("retain", "neighbor")


@dataclass(frozen=True)
class Example(TokenizedExample):
    """A tokenised record with what the baselines need beyond the distillation methods."""

    forget: bool = False  # a forget-type record (forget, adversarial, positive anchor)
    template: list[int] | None = None  # FLAT: a refusal template, the second ("good") response


@dataclass
class Context:
    """Everything a step needs that does not change between steps."""

    wrapper: torch.nn.Module  # ResponseLogits around the student (possibly DDP-wrapped)
    student: torch.nn.Module  # the unwrapped (peft) student
    teacher: ResponseLogits | None  # a frozen copy under full fine-tuning; None = adapter-disabled student
    student_prefix: torch.Tensor  # (P_s,) the student's system part (the template default)
    teacher_prefix: dict[str | None, list[int]]
    teacher_cache: dict[str | None, list]  # system -> per-layer prefix keys/values (cache_prefix=True)
    systems: dict[int, str | None]  # objective -> teacher system prompt
    needs: tuple[str, ...] = ("teacher_logits",)  # the method's passes (mule.methods.NEEDS)
    control: torch.Tensor | None = None  # RMU: (H,) the steering target c * u
    share_prefix: bool = True  # run the student's system part once per micro-batch (not with hidden states)
    base_prefix: list | None = None  # the frozen base's keys/values of the student's system part, made on first use


class ResponseHidden(ResponseLogits):
    """forward(ids, mask, rows, cols) -> (N, H): hidden states after decoder layer `layer` (0-based) at the
    response positions, in place of logits (RMU). The last layer's entry is after the final norm."""

    def __init__(self, model: torch.nn.Module, layer: int):
        super().__init__(model)
        self.layer = layer

    def _forward(self, ids, mask, rows, cols, prefix, prefix_ids=None):
        if rows is None or prefix is not None or prefix_ids is not None:
            raise MuleError("hidden states are computed on whole contexts only (no prefix cache)")
        out = causal_lm(self.model).get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states[self.layer + 1][rows, cols]  # (N, H)


def select_records(bench, config: UnlearnConfig) -> list[QARecord]:
    method_config = resolve(config.method)
    forget_only = get_method(config.method.name).data == "forget"
    records: list[QARecord] = []
    for name in config.data.files:
        recs = bench.train((name,))
        records += recs[: config.data.max_per_file] if config.data.max_per_file else recs
    records = [r for r in records if r.objective in method_config.objectives
               and (not forget_only or r.role in REFUSE_ROLES)]
    if not records:
        raise MuleError(f"the training set is empty: no records in {bench.root / 'train'} for files "
                        f"{config.data.files} and objectives {method_config.objectives}"
                        + (" (this method trains on forget-type records only)" if forget_only else ""))
    return records


def tokenize(records: list[QARecord], targets: dict[str, str], formatter: ChatFormatter,
             prefix_len: dict[int, int], config: UnlearnConfig,
             templates: dict[str, str] | None = None) -> list[TokenizedExample]:
    """Token ids per record; responses too long for model.max_length are truncated or refused.

    prefix_len: objective -> the longer of the student's and that objective's teacher's system part.
    templates: record id -> a second response (FLAT's refusal template), tokenised like the first.
    """
    out = []
    for r in records:
        longest_prefix = prefix_len[r.objective]
        body = formatter.body_ids(r.question, r.prefill)
        responses = [formatter.response_ids(targets[r.id], r.prefill)]
        if templates is not None:
            responses.append(formatter.response_ids(templates[r.id], r.prefill))
        room = config.model.max_length - longest_prefix - len(body)
        for i, response in enumerate(responses):
            if len(response) > room:
                if config.model.on_overflow == "error" or room < 1:
                    raise MuleError(f"record {r.id!r} needs {longest_prefix + len(body) + len(response)} tokens with "
                                    f"the teacher prompt, more than model.max_length={config.model.max_length}")
                log.warning("record %s: response truncated from %d to %d tokens (model.max_length=%d)", r.id,
                            len(response), room, config.model.max_length)
                responses[i] = response[:room]
        out.append(Example(r.id, r.objective, body, responses[0], r.anchor_pair_id, forget=r.role in REFUSE_ROLES,
                           template=responses[1] if templates is not None else None))
    return out


def _student_context(ctx: Context, micro: list[TokenizedExample], pad_id: int, device) -> tuple:
    """(batch, args, kwargs) of the student's pass: the rows continue the student's system part, which runs once
    for the whole micro-batch (`prefix_ids`); hidden-state passes (RMU) take it concatenated to every row."""
    batch = collate(micro, pad_id).to(device)
    p = ctx.student_prefix.to(device)
    if ctx.share_prefix and len(p):
        return batch, (batch.ids, batch.mask, batch.rows, batch.cols), {"prefix_ids": p.unsqueeze(0)}
    ids = torch.cat([p.expand(batch.ids.shape[0], -1), batch.ids], dim=1)
    mask = torch.cat([torch.ones_like(ids[:, : len(p)]), batch.mask], dim=1)
    return batch, (ids, mask, batch.rows, batch.cols + len(p)), {}


def student_logits(ctx: Context, micro: list[TokenizedExample], pad_id: int, device) -> tuple:
    """(batch, (N, V) student logits), or (N, H) hidden states when the wrapper is a ResponseHidden."""
    batch, args, kwargs = _student_context(ctx, micro, pad_id, device)
    return batch, ctx.wrapper(*args, **kwargs)


@torch.no_grad()
def base_outputs(ctx: Context, micro: list[TokenizedExample], pad_id: int, device) -> torch.Tensor:
    """The frozen base (adapter disabled, or the frozen copy) on the student's own context: what the student's
    pass returns, (N, V) logits or (N, H) hidden states, in the order of collate(micro)."""
    _, args, kwargs = _student_context(ctx, micro, pad_id, device)
    with contextlib.nullcontext() if ctx.teacher is not None else ctx.student.disable_adapter():
        module = ctx.teacher or ctx.wrapper
        if "prefix_ids" in kwargs:  # the frozen base's keys/values of the system part never change: once per run
            if ctx.base_prefix is None:
                ctx.base_prefix = module(kwargs.pop("prefix_ids"), None, None, None)
            kwargs = {"prefix": ctx.base_prefix}
        return module(*args, **kwargs)


@torch.no_grad()
def teacher_logits(ctx: Context, micro: list[TokenizedExample], pad_id: int, device) -> torch.Tensor:
    """(N, V) teacher logits in the order of collate(micro): one pass per distinct system prompt.

    `micro` must be grouped by teacher system (`group_by_system`), so the groups' logits concatenate in order.
    """
    parts = []
    disable = contextlib.nullcontext() if ctx.teacher is not None else ctx.student.disable_adapter()
    module = ctx.teacher if ctx.teacher is not None else ctx.wrapper
    with disable:
        for system in dict.fromkeys(ctx.systems[e.objective] for e in micro):
            batch = collate([e for e in micro if ctx.systems[e.objective] == system], pad_id).to(device)
            if system in ctx.teacher_cache:
                parts.append(module(batch.ids, batch.mask, batch.rows, batch.cols, prefix=ctx.teacher_cache[system]))
            else:
                p = torch.tensor(ctx.teacher_prefix[system], device=device)
                ids = torch.cat([p.expand(batch.ids.shape[0], -1), batch.ids], dim=1)
                mask = torch.cat([torch.ones_like(ids[:, : len(p)]), batch.mask], dim=1)
                parts.append(module(ids, mask, batch.rows, batch.cols + len(p)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def group_by_system(ctx: Context, micro: list[TokenizedExample]) -> list[TokenizedExample]:
    """Stable-sort a micro-batch by teacher system prompt (the teacher runs one pass per system)."""
    order = {s: i for i, s in enumerate(dict.fromkeys(ctx.systems[k] for k in sorted(ctx.systems)))}
    return sorted(micro, key=lambda e: order[ctx.systems[e.objective]])


def objective_group(e: TokenizedExample) -> str:
    """The objective whose gradient an example feeds in NGDiff/MOLLM: forget-type examples of Obj1/Obj2 ->
    forget, of Obj3 -> adversarial; retain-type ones of Obj1 -> retain, of Obj2/Obj3 -> neighbor."""
    if getattr(e, "forget", False):
        return "adversarial" if e.objective == 3 else "forget"
    return "retain" if e.objective == 1 else "neighbor"


def group_key(mean_over: str, e: TokenizedExample):
    """The group an example is averaged within (Method.mean_over)."""
    if mean_over == "role":
        return getattr(e, "forget", False)
    if mean_over == "objective":
        return objective_group(e)
    return None


def group_weights(batch, rows: list[TokenizedExample], counts: Counter, mean_over: str, n_examples: int,
                  positions: str) -> torch.Tensor:
    """(N,) weights: mean over an example's positions, then mean over its group in the whole optimiser batch
    (`counts`: group -> examples), so summed micro-batch gradients equal the batch's gradient."""
    if mean_over == "batch":
        return position_weights(batch, n_examples, positions)
    n = torch.tensor([float(counts[group_key(mean_over, e)]) for e in rows], device=batch.lengths.device)
    if positions == "first":
        return (batch.position == 0).float() / n[batch.example]
    if positions != "all":
        raise ValueError(f"positions must be 'all' or 'first', got {positions!r}")
    return 1.0 / (batch.lengths[batch.example].float() * n[batch.example])


def micro_inputs(ctx: Context, micro: list[TokenizedExample], weigh, pad_id: int, device) -> tuple[dict, object]:
    """Run the passes the method needs on one micro-batch; returns the loss's inputs by name, and the batch."""
    rows = micro
    if "refusal_labels" in ctx.needs:  # FLAT: the forget answers and their refusal templates in one pass
        rows = micro + [dataclasses.replace(e, response=e.template) for e in micro]
    batch, out = student_logits(ctx, rows, pad_id, device)
    forget = torch.tensor([getattr(e, "forget", False) for e in rows], device=device)[batch.example]  # (N,)
    inputs = {"weights": weigh(batch, rows), "labels": batch.targets, "example": batch.example % len(micro),
              "forget": forget, "good": batch.example >= len(micro)}
    inputs["hidden" if "hidden_states" in ctx.needs else "student_logits"] = out
    if "teacher_logits" in ctx.needs:
        inputs["teacher_logits"] = teacher_logits(ctx, micro, pad_id, device)
    if "reference_logprobs" in ctx.needs:
        inputs["reference_logprobs"] = token_logprobs(base_outputs(ctx, micro, pad_id, device), batch.targets)
    if "reference_hidden_states" in ctx.needs:  # the base's hidden states, on the retain-type examples only
        reference = out.detach().new_zeros(out.shape)
        retain = [e for e in micro if not getattr(e, "forget", False)]
        if retain:
            reference[~forget] = base_outputs(ctx, retain, pad_id, device).to(reference.dtype)
        inputs["reference_hidden"], inputs["control"] = reference, ctx.control
    return inputs, batch


def backward_micros(accelerator, ctx: Context, loss_fn, micros: list[list[TokenizedExample]], weigh, trainable,
                    pad_id: int) -> tuple[float, int, dict]:
    """Forward + backward over this process's micro-batches; gradients accumulate and are all-reduced at the
    last one. Returns the summed loss, tokens and metrics of this process."""
    world, device = accelerator.num_processes, accelerator.device
    total, tokens, metrics = 0.0, 0, {}
    for m, micro in enumerate(micros):
        sync = contextlib.nullcontext() if m == len(micros) - 1 else accelerator.no_sync(ctx.wrapper)
        with sync:
            if not micro:  # fewer examples than micro-batches: take part in the gradient all-reduce
                accelerator.backward(sum(p.sum() * 0.0 for p in trainable))
                continue
            micro = group_by_system(ctx, micro) if "teacher_logits" in ctx.needs else micro
            inputs, batch = micro_inputs(ctx, micro, weigh, pad_id, device)
            loss, parts = loss_fn(**inputs)
            accelerator.backward(loss * world)  # DDP averages over processes; the weights already do
        total += float(loss.detach())
        tokens += batch.n_tokens + batch.ids.shape[0] * len(ctx.student_prefix)
        for key, value in parts.items():
            metrics[key] = metrics.get(key, 0.0) + value
    return total, tokens, metrics


def pop_gradient(trainable: list[torch.nn.Parameter]) -> torch.Tensor:
    """The accumulated gradient as one flat fp32 vector (the one kept copy per objective); .grad is cleared."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in trainable])
    for p in trainable:
        p.grad = None
    return flat


def set_gradient(trainable: list[torch.nn.Parameter], direction: torch.Tensor) -> None:
    """Write a flat (P,) direction into the parameters' .grad (views of it in fp32), for the optimiser."""
    offset = 0
    for p in trainable:
        p.grad = direction[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def combine(kind: str, grads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The update direction d (theta <- theta - lr d) from the objectives' gradients of their minimised losses."""
    if kind == "ngdiff":
        return normalized_sum(list(grads.values())), {}
    if kind == "mgda":
        d, weights = common_descent(list(grads.values()))
        return d, {f"mgda_weight/{g}": float(w) for g, w in zip(grads, weights)}
    if kind == "projection":
        forget = [grads[g] for g in ("forget", "adversarial") if g in grads]
        if not forget:
            return torch.zeros_like(next(iter(grads.values()))), {}
        u = forget[0]
        for g in forget[1:]:
            u.add_(g)  # in place: no further copy
        return project_out(u, [grads[g] for g in DESCENT_GROUPS if g in grads]), {}
    raise MuleError(f"unknown gradient combination {kind!r}")


@torch.no_grad()
def probe_lr(ctx: Context, loss_fn, trainable, descent_micros, weigh, pad_id: int, accelerator, lr: float
             ) -> tuple[float, dict[str, float]]:
    """NGDiff's AutoLR: the descent loss at theta - x d for x in (-lr, 0, lr) (d = the .grad direction), a
    parabola through the changes, and GeN's update of lr. Parameters are restored exactly afterwards.

    When the loss changes are below fp32 resolution the fit is noise, and GeN's "halve on failure" would shrink
    lr to zero; lr is then kept instead (a departure from GeN, logged as autolr_unresolved)."""
    steps = [-lr, 0.0, lr]
    saved = [p.detach().clone() for p in trainable]  # the trainable weights, once, while probing
    values = []
    for x in steps:
        for p, s in zip(trainable, saved):
            p.copy_(s - x * p.grad)
        value = sum(float(loss_fn(**micro_inputs(ctx, m, weigh, pad_id, accelerator.device)[0])[0])
                    for m in descent_micros if m)
        values.append(float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum")))
    for p, s in zip(trainable, saved):
        p.copy_(s)
    deltas = [v - values[1] for v in values]
    if max(abs(d) for d in deltas) < 1e-6 * max(abs(values[1]), 1.0):  # below fp32 resolution: nothing to fit
        return lr, {"autolr_unresolved": 1.0}
    a, b, r2 = fit_parabola(steps, deltas)
    return update_lr(lr, a, b, r2), {"autolr_a": a, "autolr_b": b, "autolr_r2": r2}


def make_student(model, config: UnlearnConfig, device, needs_teacher: bool = True):
    """LoRA on all linear layers (teacher = adapter disabled), or full fine-tuning with a frozen teacher copy."""
    if not config.lora.enabled:
        teacher = None
        if needs_teacher:
            teacher = ResponseLogits(copy.deepcopy(model)).to(device).eval().requires_grad_(False)
        model.requires_grad_(True)
        return model, teacher
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    student = get_peft_model(model, lora)
    if model.dtype in (torch.bfloat16, torch.float16) and device.type == "cuda":
        half_precision_lora(student)  # ResponseLogits runs it under autocast
    return student, None


def freeze_after_layer(model: torch.nn.Module, layer: int) -> None:
    """RMU: only the embeddings and decoder layers 0..layer can move the steered hidden state; freeze the rest
    (no wasted optimiser state, and DDP needs every trainable parameter to get a gradient)."""
    lm = causal_lm(model)
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None or layer >= len(layers):
        raise MuleError(f"method.layer={layer} is not a decoder layer of this model "
                        f"({len(layers) if layers is not None else 'no'} layers)")
    keep = {id(p) for p in lm.get_input_embeddings().parameters()}
    keep |= {id(p) for block in layers[: layer + 1] for p in block.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def make_optimizer(method: Method, trainable, config: UnlearnConfig) -> torch.optim.Optimizer:
    if method.optimizer == "sgd":  # NGDiff: theta <- theta - lr * d exactly
        return torch.optim.SGD(trainable, lr=config.train.lr)
    return torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay,
                             betas=(0.9, 0.999))


def setup(config: UnlearnConfig, run_dir: Path, accelerator):
    """Load model and data, cache teacher targets, tokenise: everything before the first step."""
    device = accelerator.device
    config.method = resolve(config.method)
    method = get_method(config.method.name)
    bench = load_benchmark(config.benchmark)
    records = select_records(bench, config)
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    model = load_model(config.model.name, pick_dtype(config.model.dtype, device),
                       config.model.trust_remote_code).to(device)
    formatter = ChatFormatter(tokenizer)
    teacher = method.teacher if method.teacher != "none" else "base"
    systems = {k: system_prompt(teacher, k, bench.domain, config.teacher.prompts, config.teacher.cot,
                                config.teacher.prompt_set) for k in (1, 2, 3)}
    refusals = refusal_templates(bench.domain.refusal, config.method.refusals)
    make_targets = partial(response_targets, records, systems, formatter, model, run_dir / "teacher_targets.jsonl",
                           config.model.name, config.method.forget_target, config.teacher.max_new_tokens,
                           config.teacher.generation_batch_size, bench.domain.refusal, refusals)
    if accelerator.is_main_process:  # generate once; the other processes then read the cache
        targets, refusal_share = make_targets()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        targets, refusal_share = make_targets()
    records, leaked = drop_leaks(records, targets, config, bench.domain.refusal)
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and config.model.max_length > max_len:
        config.model.max_length = max_len
    prefix_len = {k: max(len(formatter.prefix_ids(None)), len(formatter.prefix_ids(s))) for k, s in systems.items()}
    templates = ({r.id: pick_refusal(r.id, refusals) for r in records} if "refusal_labels" in method.needs else None)
    examples = tokenize(records, targets, formatter, prefix_len, config, templates)
    return model, tokenizer, formatter, systems, examples, {"teacher_target_refusal_share": refusal_share,
                                                            "teacher_leaks_dropped": leaked}


def drop_leaks(records: list[QARecord], targets: dict[str, str], config: UnlearnConfig, refusal: str | None
               ) -> tuple[list[QARecord], int]:
    """Leave out refuse-type records whose teacher-generated target answers instead of refusing (METHOD_SPEC 3.3:
    "regenerate or filter the rest"): aligned on such a target, the student would learn to give the forget
    answer with the teacher's own logits. `teacher.leaks=keep` trains on them. Returns (records, how many left out)."""
    leaks = config.teacher.leaks
    if leaks not in ("drop", "keep"):
        raise MuleError(f"teacher.leaks must be 'drop' or 'keep', got {leaks!r}")
    if leaks == "keep":
        return records, 0
    kept = [r for r in records if not needs_generation(r, config.method.forget_target)
            or is_refusal(targets[r.id], refusal)]
    if not kept:
        raise MuleError(f"the teacher refused none of the {len(records)} refuse-type records, so none is left to train "
                        "on (teacher.leaks=drop): check the intention prompts on this model, or set teacher.leaks=keep")
    if len(kept) < len(records):
        log.warning("left out %d refuse-type records whose teacher target does not refuse (teacher.leaks=drop)",
                    len(records) - len(kept))
    return kept, len(records) - len(kept)


def run_unlearn(config: UnlearnConfig, argv: list[str] | None = None) -> Path:
    """Train one method on a benchmark and write the run directory; returns its path."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.method = resolve(config.method)  # the run's config.yaml records the method's defaults
    accelerator = Accelerator()
    run_dir = open_run_dir(config, accelerator, argv)
    set_seed(config.train.seed)
    model, tokenizer, formatter, systems, examples, summary = setup(config, run_dir, accelerator)
    return fit(config, run_dir, accelerator, model, tokenizer, examples, formatter.prefix_ids(None),
               {s: formatter.prefix_ids(s) for s in systems.values()}, systems, summary)


def training_schedule(batcher, examples: list[TokenizedExample], lead: list[TokenizedExample], lead_epochs: int,
                      train) -> list[tuple[int, list[int]]]:
    """(epoch, batch) pairs over `examples + lead`: `lead_epochs` epochs of the lead examples (indices from
    len(examples) on), then `train.epochs` epochs of `examples`; cut at `train.max_steps`."""
    offset, lead_epochs = len(examples), lead_epochs if lead else 0
    schedule = [(e, [offset + j for j in batch]) for e in range(lead_epochs)
                for batch in batcher(lead, train.batch_size, train.seed + 1000, e)]
    schedule += [(lead_epochs + e, batch) for e in range(train.epochs)
                 for batch in batcher(examples, train.batch_size, train.seed, e)]
    return schedule[: train.max_steps] if train.max_steps else schedule


def fit(config: UnlearnConfig, run_dir: Path, accelerator, model, tokenizer, examples: list[TokenizedExample],
        student_prefix: list[int], teacher_prefix: dict, systems: dict[int, str | None], summary: dict,
        lead_in: tuple[list[TokenizedExample], int, float] = ((), 0, 1.0)) -> Path:
    """The training loop: examples in, adapter (or weights), train log and result.json out.

    `lead_in` = (examples, epochs, lr scale): those examples alone for that many epochs, at `train.lr` times the
    scale, before the `train.epochs` over `examples` (target preparation learns the benchmark's facts first).
    """
    device = accelerator.device
    method = get_method(config.method.name)
    method_config = resolve(config.method)
    needs = method.needs
    student, teacher = make_student(model, config, device, any(n in needs for n in BASE_PASSES))
    hidden = "hidden_states" in needs
    if hidden:
        freeze_after_layer(student, method_config.layer)
        teacher = ResponseHidden(teacher.model, method_config.layer) if teacher is not None else None
    loss_fn = bind_loss(config.method)
    pad_id = tokenizer.pad_token_id

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(method, trainable, config)
    warmup = max(1, config.train.warmup_steps)
    batcher = length_grouped_batches if config.train.group_by_length else stratified_batches
    lead, lead_epochs, lead_scale = lead_in
    schedule = training_schedule(batcher, examples, list(lead), lead_epochs, config.train)
    n_lead = sum(batch[0] >= len(examples) for _, batch in schedule)  # the lead-in's steps come first
    n_examples = len(examples) + (len(lead) if n_lead else 0)  # distinct examples trained on
    examples = examples + list(lead)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (lead_scale if s < n_lead else 1.0))
    start_step = load_checkpoint(run_dir, student, optimizer, scheduler)

    wrapper = ResponseHidden(student, method_config.layer) if hidden else ResponseLogits(student)
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    control = None
    if hidden:
        hidden_size = causal_lm(student).config.hidden_size
        control = control_vector(hidden_size, method_config.steering_coeff, config.train.seed).to(device)
    ctx = Context(wrapper, student, teacher, torch.tensor(student_prefix, dtype=torch.long), teacher_prefix, {},
                  systems, needs, control, share_prefix=not hidden)
    if "teacher_logits" in needs and config.teacher.cache_prefix:  # frozen teacher: its prompt's K/V never change
        with contextlib.nullcontext() if teacher else student.disable_adapter(), torch.no_grad():
            module = teacher or wrapper
            for s, ids in ctx.teacher_prefix.items():
                ctx.teacher_cache[s] = module(torch.tensor([ids], device=device), None, None, None)

    world, accum = accelerator.num_processes, config.train.grad_accum
    max_norm = float("inf") if method.combine else config.train.max_grad_norm  # a combined direction is not clipped
    bar = tqdm(total=len(schedule), initial=start_step, desc=f"train [{config.method.name}]", unit="step",
               disable=not accelerator.is_local_main_process)
    log_path = run_dir / "train_log.jsonl"
    started = time.time()
    last = {}
    for step in range(start_step, len(schedule)):
        epoch, indices = schedule[step]
        t0 = time.time()
        own = split_micro(indices, world * accum)[accelerator.process_index * accum:][:accum]
        counts = Counter(group_key(method.mean_over, examples[i]) for i in indices)
        weigh = partial(group_weights, counts=counts, mean_over=method.mean_over, n_examples=len(indices),
                        positions=config.method.positions)
        # one pass over the micro-batches, or one per objective present in the batch (NGDiff, MOLLM)
        groups = [g for g in OBJECTIVE_GROUPS if g in counts] if method.combine else [None]
        total, tokens, metrics, grads = 0.0, 0, {}, {}
        for group in groups:
            micros = [[examples[i] for i in m if group is None or objective_group(examples[i]) == group] for m in own]
            loss, n, parts = backward_micros(accelerator, ctx, loss_fn, micros, weigh, trainable, pad_id)
            total, tokens = total + loss, tokens + n
            if group is None:
                metrics = parts
            else:  # keep this objective's gradient; log its loss
                grads[group] = pop_gradient(trainable)
                metrics[f"loss/{group}"] = loss
        if grads:
            direction, extra = combine(method.combine, grads)
            del grads
            set_gradient(trainable, direction)
            metrics.update({k: v / world for k, v in extra.items()})
        total = float(accelerator.reduce(torch.tensor(total, device=device), "sum"))
        grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise MuleError(f"non-finite loss or gradient at step {step + 1} (loss {total}, grad norm {grad_norm}); "
                            f"stopped without updating. The last good checkpoint is kept in {run_dir / 'checkpoint'}: "
                            "lower train.lr or check the data, then rerun to resume from it.")
        if method.combine == "ngdiff" and method_config.auto_lr and step % method_config.auto_lr_every == 0:
            descent = [[examples[i] for i in m if objective_group(examples[i]) in DESCENT_GROUPS] for m in own]
            if any(objective_group(examples[i]) in DESCENT_GROUPS for i in indices):
                lr = optimizer.param_groups[0]["lr"]
                new_lr, extra = probe_lr(ctx, loss_fn, trainable, descent, weigh, pad_id, accelerator, lr)
                scheduler.base_lrs = [b * new_lr / lr for b in scheduler.base_lrs]  # checkpointed with the scheduler
                for g in optimizer.param_groups:
                    g["lr"] = new_lr
                metrics.update({k: v / world for k, v in extra.items()})
        used_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t0
        last = {"step": step + 1, "epoch": epoch, "loss": total, "grad_norm": grad_norm, "lr": used_lr,
                "examples": len(indices), "tokens": tokens * world, "seconds": round(seconds, 4),
                **{k: v * world for k, v in metrics.items()}}
        if accelerator.is_main_process:
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens * world / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if config.train.save_every and (step + 1) % config.train.save_every == 0 and step + 1 < len(schedule):
            save_checkpoint(run_dir, accelerator, student, optimizer, scheduler, step + 1)
    bar.close()
    save_weights(run_dir, accelerator, student, tokenizer, config.lora.enabled)
    summary = {"steps": len(schedule), "examples": n_examples, "seconds": round(time.time() - started, 2),
               "final": last, **summary, "trainable_parameters": sum(p.numel() for p in trainable)}
    finish_run(run_dir, accelerator, summary)
    return run_dir
