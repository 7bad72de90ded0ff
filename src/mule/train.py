"""`mule unlearn`: one explicit training loop for the distillation methods.

Per optimiser step: the student forward + backward on its own context, one teacher forward on the
intention-prompted context (the same base weights with the LoRA adapter disabled, or a frozen copy under
full fine-tuning), logits only at response positions, and the loss on the gathered logits. Nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
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
from mule.methods import bind_loss, get_method
from mule.modeling import ResponseLogits, half_precision_lora
from mule.models import load_model, load_tokenizer, pick_dtype
from mule.prompts import system_prompt
from mule.records import QARecord
from mule.rundir import (
    finish_run,
    load_checkpoint,
    open_run_dir,
    save_checkpoint,
    save_weights,
)
from mule.targets import response_targets

log = logging.getLogger(__name__)


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


def select_records(bench, config: UnlearnConfig) -> list[QARecord]:
    records: list[QARecord] = []
    for name in config.data.files:
        recs = bench.train((name,))
        records += recs[: config.data.max_per_file] if config.data.max_per_file else recs
    records = [r for r in records if r.objective in config.method.objectives]
    if not records:
        raise MuleError(f"the training set is empty: no records in {bench.root / 'train'} for files "
                        f"{config.data.files} and objectives {config.method.objectives}")
    return records


def tokenize(records: list[QARecord], targets: dict[str, str], formatter: ChatFormatter,
             prefix_len: dict[int, int], config: UnlearnConfig) -> list[TokenizedExample]:
    """Token ids per record; responses too long for model.max_length are truncated or refused.

    prefix_len: objective -> the longer of the student's and that objective's teacher's system part.
    """
    out = []
    for r in records:
        longest_prefix = prefix_len[r.objective]
        body = formatter.body_ids(r.question, r.prefill)
        response = formatter.response_ids(targets[r.id], r.prefill)
        room = config.model.max_length - longest_prefix - len(body)
        if len(response) > room:
            if config.model.on_overflow == "error" or room < 1:
                raise MuleError(f"record {r.id!r} needs {longest_prefix + len(body) + len(response)} tokens with "
                                f"the teacher prompt, more than model.max_length={config.model.max_length}")
            log.warning("record %s: response truncated from %d to %d tokens (model.max_length=%d)", r.id,
                        len(response), room, config.model.max_length)
            response = response[:room]
        out.append(TokenizedExample(r.id, r.objective, body, response, r.anchor_pair_id))
    return out


def student_logits(ctx: Context, micro: list[TokenizedExample], pad_id: int, device) -> tuple:
    batch = collate(micro, pad_id).to(device)
    p = ctx.student_prefix.to(device)
    ids = torch.cat([p.expand(batch.ids.shape[0], -1), batch.ids], dim=1)
    mask = torch.cat([torch.ones_like(ids[:, : len(p)]), batch.mask], dim=1)
    return batch, ctx.wrapper(ids, mask, batch.rows, batch.cols + len(p))  # (N, V)


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


def setup(config: UnlearnConfig, run_dir: Path, accelerator):
    """Load model and data, cache teacher targets, tokenise: everything before the first step."""
    device = accelerator.device
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
    forget_target = method.forget_target or config.method.forget_target
    make_targets = partial(response_targets, records, systems, formatter, model, run_dir / "teacher_targets.jsonl",
                           config.model.name, forget_target, config.teacher.max_new_tokens,
                           config.teacher.generation_batch_size, bench.domain.refusal)
    if accelerator.is_main_process:  # generate once; the other processes then read the cache
        targets, refusal_share = make_targets()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        targets, refusal_share = make_targets()
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len and config.model.max_length > max_len:
        config.model.max_length = max_len
    prefix_len = {k: max(len(formatter.prefix_ids(None)), len(formatter.prefix_ids(s))) for k, s in systems.items()}
    examples = tokenize(records, targets, formatter, prefix_len, config)
    return model, tokenizer, formatter, systems, examples, refusal_share


def run_unlearn(config: UnlearnConfig, argv: list[str] | None = None) -> Path:
    """Train one method on a benchmark and write the run directory; returns its path."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator()
    run_dir = open_run_dir(config, accelerator, argv)
    set_seed(config.train.seed)
    model, tokenizer, formatter, systems, examples, refusal_share = setup(config, run_dir, accelerator)
    return fit(config, run_dir, accelerator, model, tokenizer, examples, formatter.prefix_ids(None),
               {s: formatter.prefix_ids(s) for s in systems.values()}, systems,
               {"teacher_target_refusal_share": refusal_share})


def fit(config: UnlearnConfig, run_dir: Path, accelerator, model, tokenizer, examples: list[TokenizedExample],
        student_prefix: list[int], teacher_prefix: dict, systems: dict[int, str | None], summary: dict) -> Path:
    """The training loop: examples in, adapter (or weights), train log and result.json out."""
    device = accelerator.device
    needs_teacher = "teacher_logits" in get_method(config.method.name).needs
    student, teacher = make_student(model, config, device, needs_teacher)
    loss_fn = bind_loss(config.method)
    pad_id = tokenizer.pad_token_id

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                  betas=(0.9, 0.999))
    warmup = max(1, config.train.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    start_step = load_checkpoint(run_dir, student, optimizer, scheduler)

    wrapper = ResponseLogits(student)
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    ctx = Context(wrapper, student, teacher, torch.tensor(student_prefix, dtype=torch.long), teacher_prefix, {},
                  systems)
    if needs_teacher and config.teacher.cache_prefix:  # the teacher is frozen: its prompt's K/V never change
        with contextlib.nullcontext() if teacher else student.disable_adapter(), torch.no_grad():
            module = teacher or wrapper
            for s, ids in ctx.teacher_prefix.items():
                ctx.teacher_cache[s] = module(torch.tensor([ids], device=device), None, None, None)

    batcher = length_grouped_batches if config.train.group_by_length else stratified_batches
    epochs = [batcher(examples, config.train.batch_size, config.train.seed, e) for e in range(config.train.epochs)]
    schedule = [(e, b) for e, batches in enumerate(epochs) for b in batches]
    if config.train.max_steps:
        schedule = schedule[: config.train.max_steps]
    world, accum = accelerator.num_processes, config.train.grad_accum
    bar = tqdm(total=len(schedule), initial=start_step, desc=f"train [{config.method.name}]", unit="step",
               disable=not accelerator.is_local_main_process)
    log_path = run_dir / "train_log.jsonl"
    started = time.time()
    last = {}
    for step in range(start_step, len(schedule)):
        epoch, indices = schedule[step]
        t0 = time.time()
        micros = split_micro(indices, world * accum)[accelerator.process_index * accum:][:accum]
        total, tokens, metrics = 0.0, 0, {}
        for m, micro_idx in enumerate(micros):
            micro = [examples[i] for i in micro_idx]
            micro = group_by_system(ctx, micro) if needs_teacher else micro
            sync = contextlib.nullcontext() if m == len(micros) - 1 else accelerator.no_sync(wrapper)
            with sync:
                if not micro:  # fewer examples than micro-batches: take part in the gradient all-reduce
                    accelerator.backward(sum(p.sum() * 0.0 for p in trainable))
                    continue
                batch, zs = student_logits(ctx, micro, pad_id, device)
                reference = teacher_logits(ctx, micro, pad_id, device) if needs_teacher else batch.targets
                weights = position_weights(batch, len(indices), config.method.positions)
                loss, parts = loss_fn(zs, reference, weights)
                accelerator.backward(loss * world)  # DDP averages over processes; the weights already do
            total += float(loss.detach())
            tokens += batch.n_tokens + len(micro) * len(ctx.student_prefix)
            for key, value in parts.items():
                metrics[key] = metrics.get(key, 0.0) + value
        total = float(accelerator.reduce(torch.tensor(total, device=device), "sum"))
        grad_norm = float(accelerator.clip_grad_norm_(trainable, config.train.max_grad_norm))
        if not (math.isfinite(total) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise MuleError(f"non-finite loss or gradient at step {step + 1} (loss {total}, grad norm {grad_norm}); "
                            f"stopped without updating. The last good checkpoint is kept in {run_dir / 'checkpoint'}: "
                            "lower train.lr or check the data, then rerun to resume from it.")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t0
        last = {"step": step + 1, "epoch": epoch, "loss": total, "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0], "examples": len(indices), "tokens": tokens * world,
                "seconds": round(seconds, 4), **{k: v * world for k, v in metrics.items()}}
        if accelerator.is_main_process:
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tokens * world / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if config.train.save_every and (step + 1) % config.train.save_every == 0 and step + 1 < len(schedule):
            save_checkpoint(run_dir, accelerator, student, optimizer, scheduler, step + 1)
    bar.close()
    save_weights(run_dir, accelerator, student, tokenizer, config.lora.enabled)
    summary = {"steps": len(schedule), "examples": len(examples), "seconds": round(time.time() - started, 2),
               "final": last, **summary, "trainable_parameters": sum(p.numel() for p in trainable)}
    finish_run(run_dir, accelerator, summary)
    return run_dir
