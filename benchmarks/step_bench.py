"""Step benchmark: mule's distillation step against a naive one and against a LoRA SFT step.

    python benchmarks/step_bench.py --shape cpu-small            # this 2-core CPU, seconds
    python benchmarks/step_bench.py --shape llama-8b --batch 32  # a GPU, random-init Llama-3.1-8B shape

All variants train the same LoRA (r=16, all linear layers; on a GPU fp32 adapter weights with bf16 compute
under autocast) on the same random batch:
  naive : a second full teacher copy; full-vocabulary fp32 logits at every position of both passes;
          the teacher re-reads its intention prompt every step.
  mule  : the code path of `mule unlearn` (mule.train.student_logits / teacher_logits): teacher = the same
          base with the adapter disabled; logits only at response positions; the intention prompt's
          keys/values computed once and reused.
  mule_nocache : mule with teacher.cache_prefix=false (optional variant)
  sft   : plain LoRA SFT, the usual `model(input_ids, labels=...)` (cross-entropy on the response).
Each variant runs in a fresh process, so peak memory (GPU: max allocated; CPU: max RSS) is its own.
Prints ms/step, peak memory, and the ratios naive/mule (time) and mule/naive (memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import subprocess
import sys
import time

import torch

SHAPES = {  # random-init Llama configs
    "cpu-small": dict(vocab_size=49152, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            base = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return base, lora, get_peft_model


def make_batch(args, vocab: int):
    from mule.batching import TokenizedExample

    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompt = rand(args.prompt)
    examples = [TokenizedExample(str(i), 1 + i % 3, rand(args.seq - args.response), rand(args.response))
                for i in range(args.batch)]
    return prompt, examples


def step_mule(model, ctx, examples, loss_fn, device):
    from mule.batching import position_weights
    from mule.train import group_by_system, student_logits, teacher_logits  # the code path of mule unlearn

    examples = group_by_system(ctx, examples)
    batch, zs = student_logits(ctx, examples, 0, device)
    zt = teacher_logits(ctx, examples, 0, device)
    loss, _ = loss_fn(zs, zt, position_weights(batch, len(examples)))
    loss.backward()


def step_naive(student, teacher, prompt, examples, loss_fn, device):
    from mule.batching import collate, position_weights

    batch = collate(examples, 0).to(device)
    p = torch.tensor(prompt, device=device).expand(len(examples), -1)
    zs_full = student(input_ids=batch.ids, attention_mask=batch.mask).logits.float()  # (B, T, V)
    with torch.no_grad():
        ids = torch.cat([p, batch.ids], 1)
        mask = torch.cat([torch.ones_like(p), batch.mask], 1)
        zt_full = teacher(input_ids=ids, attention_mask=mask).logits.float()  # (B, P + T, V)
    zs = zs_full[batch.rows, batch.cols]
    zt = zt_full[batch.rows, batch.cols + p.shape[1]]
    loss, _ = loss_fn(zs, zt, position_weights(batch, len(examples)))
    loss.backward()


def step_sft(model, examples, device):
    from mule.batching import collate

    batch = collate(examples, 0).to(device)
    labels = torch.full_like(batch.ids, -100)
    labels[batch.rows, batch.cols + 1] = batch.targets
    model(input_ids=batch.ids, attention_mask=batch.mask, labels=labels).loss.backward()


def run_variant(args) -> dict:
    from functools import partial

    from mule.losses import bidirectional_topk_loss
    from mule.train import Context

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base, lora, get_peft_model = build(args.shape, device, dtype)
    prompt, examples = make_batch(args, base.config.vocab_size)
    loss_fn = partial(bidirectional_topk_loss, k=args.k, alpha=1.0, beta=1.0)
    teacher = copy.deepcopy(base).eval().requires_grad_(False) if args.variant == "naive" else None
    model = get_peft_model(base, lora)
    if device.type == "cuda":  # every variant: fp32 adapter weights, bf16 compute under autocast
        from mule.modeling import half_precision_lora

        half_precision_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if args.variant in ("mule", "mule_nocache"):
        from mule.modeling import ResponseLogits

        wrapper = ResponseLogits(model)
        systems = {1: "p1", 2: "p1", 3: "p1"}  # one shared intention prompt, as in the GPU anchor
        ctx = Context(wrapper, model, None, torch.tensor([], dtype=torch.long), {"p1": prompt}, {}, systems)
        if args.variant == "mule":  # mule_nocache = teacher.cache_prefix=false: the prompt is re-read every step
            with model.disable_adapter(), torch.no_grad():
                ctx.teacher_cache["p1"] = wrapper(torch.tensor([prompt], device=device), None, None, None)
        step = lambda: step_mule(model, ctx, examples, loss_fn, device)  # noqa: E731
    elif args.variant == "naive":
        step = lambda: step_naive(model, teacher, prompt, examples, loss_fn, device)  # noqa: E731
    else:
        step = lambda: step_sft(model, examples, device)  # noqa: E731

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype) if device.type == "cuda" else contextlib.nullcontext():
            step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = sorted(timed() for _ in range(args.steps))
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"variant": args.variant, "ms_per_step": 1000 * times[len(times) // 2], "peak_gib": peak,
            "memory_kind": "GPU max allocated" if device.type == "cuda" else "process max RSS"}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="cpu-small", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="query + response tokens of the student")
    ap.add_argument("--response", type=int, default=64, help="response tokens (where the loss is)")
    ap.add_argument("--prompt", type=int, default=256, help="intention-prompt tokens of the teacher")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="naive,mule,sft")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    rows = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows[variant] = {"variant": variant, "error": proc.stderr.strip().splitlines()[-1]}
        else:
            rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[variant]), flush=True)
    head = (f"shape {args.shape}, batch {args.batch} x {args.seq} tokens ({args.response} response), "
            f"prompt {args.prompt}, top-K {args.k}, LoRA r=16; {machine()}")
    print("\n" + head)
    print(f"| variant | ms/step | peak GiB ({rows.get('mule', {}).get('memory_kind', '')}) |\n|---|---|---|")
    for r in rows.values():
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | |")
        else:
            print(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} |")
    if all(v in rows and "error" not in rows[v] for v in ("naive", "mule")):
        n, m = rows["naive"], rows["mule"]
        print(f"\nspeed-up naive/mule: {n['ms_per_step'] / m['ms_per_step']:.2f}x; "
              f"memory mule/naive: {m['peak_gib'] / n['peak_gib']:.2f}x")
    if "sft" in rows and "mule" in rows and "error" not in rows["sft"] and "error" not in rows["mule"]:
        print(f"mule step / SFT step: {rows['mule']['ms_per_step'] / rows['sft']['ms_per_step']:.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": head, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
