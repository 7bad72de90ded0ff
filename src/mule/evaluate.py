"""`mule eval`: the paper's evaluation of one system on one benchmark (METHOD_SPEC section 5).

A system is a model (the base, an unlearned run, any hub model) plus how its system prompt is chosen:
    base     - no system prompt (trained models are evaluated this way);
    ensemble - all intention prompts joined, for every query (the paper's ET row);
    oracle   - each query gets its own objective's prompt (the paper's upper bound).
Outputs: metrics.json (written last, atomically) and samples/*.jsonl with every generation and score.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mule.benchmark import Benchmark, load_benchmark
from mule.chat import ChatFormatter
from mule.errors import MuleError, unknown
from mule.generation import greedy_generate
from mule.judge import LLMJudge, rouge_l, rule_judge
from mule.llm_client import ChatClient, ClientConfig
from mule.mcq import last_token_logits, letter_token_ids, mcq_metrics, pick_letters, shuffle
from mule.models import load_model, load_tokenizer, pick_dtype
from mule.prompts import SYSTEMS, system_prompt
from mule.records import write_jsonl
from mule.refusal import is_refusal

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    benchmark: str = "hp"
    model: str = "smollm2-135m"  # hub id, folder, embedded name; ignored when `run` is given
    run: str | None = None  # a `mule unlearn` run directory: its base model + its adapter (or full weights)
    system: str = "base"  # base | ensemble | oracle
    output_dir: str = "runs/eval"
    overwrite: bool = False
    dtype: str = "auto"
    max_new_tokens: int = 64  # open QA answers (Obj1)
    prefill_max_new_tokens: int = 128  # continuations after an attacker prefix (Obj3)
    batch_size: int = 32  # generation batch: on a 2-core CPU, 32 rows decode 1.5x faster than 16
    limit: int | None = None  # evaluate the first N items of each file (quick runs)
    mcq_seed: int = 0  # option order of the multiple-choice items
    judge: str = "rule"  # rule | llm (rule is always computed too)
    llm: ClientConfig = field(default_factory=ClientConfig)
    mmlu: bool = False  # MMLU through lm-eval (needs the dataset)
    prompts: dict[int, str] = field(default_factory=dict)  # intention prompt overrides, as in training
    cot: bool = True  # append the silent chain-of-thought suffix to the intention prompts
    prompt_set: str = "paper"  # paper or small, as in training (`teacher.prompt_set`)


def load_system_model(config: EvalConfig, device: torch.device):
    """(model, tokenizer, description) for a model name or a run directory."""
    if config.run is None:
        name = config.model
        return (load_model(name, pick_dtype(config.dtype, device)).to(device), load_tokenizer(name), name)
    run = Path(config.run)
    saved = run / "config.yaml"
    if not saved.is_file():
        raise MuleError(f"{run}: not a mule run directory (no config.yaml)")
    import yaml

    base = yaml.safe_load(saved.read_text(encoding="utf-8"))["config"]["model"]["name"]
    if (run / "model").is_dir():
        path = run / "model"
        return load_model(path, pick_dtype(config.dtype, device)).to(device), load_tokenizer(path), str(path)
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise MuleError(f"{run}: the run has no adapter/ or model/ (is it finished?)")
    from peft import PeftModel

    model = load_model(base, pick_dtype(config.dtype, device)).to(device)
    model = PeftModel.from_pretrained(model, run / "adapter").merge_and_unload()  # merged: plain-model speed
    return model.eval(), load_tokenizer(base), f"{base} + {run / 'adapter'}"


def _items(bench: Benchmark, name: str, limit: int | None) -> list:
    items = bench.eval(name)
    return items[:limit] if limit else items


def eval_open_qa(model, fmt: ChatFormatter, records, system: str | None, config: EvalConfig,
                 refusal: str, desc: str) -> tuple[dict[str, float], list[dict]]:
    bodies = [fmt.body_ids(r.question) for r in records]
    outs = greedy_generate(model, fmt.tokenizer, bodies, config.max_new_tokens, config.batch_size, desc=desc,
                           prefix=fmt.prefix_ids(system))
    samples = []
    for r, out in zip(records, outs):
        recall, f1 = rouge_l(out, r.answer)
        samples.append({"id": r.id, "question": r.question, "answer": r.answer, "prediction": out,
                        "rougeL_recall": recall, "rougeL_f1": f1, "refusal": is_refusal(out, refusal)})
    n = len(samples)
    return ({"recall": 100 * sum(s["rougeL_recall"] for s in samples) / n,
             "f1": 100 * sum(s["rougeL_f1"] for s in samples) / n,
             "refusal": 100 * sum(s["refusal"] for s in samples) / n}, samples)


def eval_mcq(model, fmt: ChatFormatter, records, system: str | None, config: EvalConfig,
             desc: str) -> tuple[dict[str, float], list[dict]]:
    items = [shuffle(r, config.mcq_seed) for r in records]
    bodies = [fmt.body_ids(it.prompt()) for it in items]
    logits = last_token_logits(model, bodies, fmt.tokenizer.pad_token_id, config.batch_size, desc=desc,
                               prefix=fmt.prefix_ids(system))
    letter_ids = letter_token_ids(fmt.tokenizer, max(len(it.order) for it in items))
    picks = pick_letters(logits, items, letter_ids)
    samples = [{"id": it.record.id, "question": it.record.question,
                "shown": [it.record.choices[j] for j in it.order], "gold": it.gold_letter, "picked": p,
                "correct": p == it.gold_letter, "refusal": p == it.refusal_letter} for it, p in zip(items, picks)]
    return mcq_metrics(items, picks), samples


def eval_prefill(model, fmt: ChatFormatter, records, system: str | None, config: EvalConfig,
                 judge: LLMJudge | None) -> tuple[dict[str, float], list[dict]]:
    """The assistant turn opens with the attacker's prefix; only the continuation is judged."""
    bodies = [fmt.body_ids(r.question, r.prefill) for r in records]
    outs = greedy_generate(model, fmt.tokenizer, bodies, config.prefill_max_new_tokens, config.batch_size,
                           desc="prefill attack", prefix=fmt.prefix_ids(system))
    samples = []
    for r, out in zip(records, outs):
        leak, detail = rule_judge(out, r.answer, r.entities, question=r.question)
        samples.append({"id": r.id, "question": r.question, "prefill": r.prefill, "answer": r.answer,
                        "continuation": out, "leak_rule": leak, **detail})
    metrics = {"asr_rule": 100 * sum(s["leak_rule"] for s in samples) / len(samples)}
    if judge is not None:
        verdicts = judge.judge_many([{"question": s["question"], "answer": s["answer"], "prefill": s["prefill"],
                                      "continuation": s["continuation"]} for s in samples])
        for s, v in zip(samples, verdicts):
            s["leak_judge"] = v
        judged = [v for v in verdicts if v is not None]
        metrics["asr_judge"] = 100 * sum(judged) / len(judged) if judged else float("nan")
        metrics["judge_unparsed"] = len(verdicts) - len(judged)
    metrics["asr"] = metrics["asr_judge"] if judge is not None else metrics["asr_rule"]
    return metrics, samples


def run_eval(config: EvalConfig) -> Path:
    """Evaluate one system on one benchmark; write metrics.json and samples/; return the output folder."""
    if config.system not in SYSTEMS:
        raise unknown("system", config.system, SYSTEMS)
    if config.judge not in ("rule", "llm"):
        raise MuleError(f"judge must be 'rule' or 'llm', got {config.judge!r}")
    out = Path(config.output_dir)
    if (out / "metrics.json").is_file() and not config.overwrite:
        raise MuleError(f"{out} already holds metrics.json; pass overwrite=true or choose another output_dir")
    bench = load_benchmark(config.benchmark)
    names = ("forget_qa", "retain_qa", "neighbor_mcq", "prefill", "utility_mcq")
    data = {n: _items(bench, n, config.limit) for n in names if n != "utility_mcq" or bench.has_eval(n)}
    judge = LLMJudge(ChatClient(config.llm, out / "judge_cache.jsonl")) if config.judge == "llm" else None
    if judge is not None:  # fail before the model runs if the endpoint is misconfigured or unreachable
        judge.client.complete([{"role": "user", "content": "Reply with the digit 1."}], max_tokens=4)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    model, tokenizer, description = load_system_model(config, device)
    fmt = ChatFormatter(tokenizer)
    sys_k = {k: system_prompt(config.system, k, bench.domain, config.prompts, config.cot, config.prompt_set) for k in (1, 2, 3)}
    refusal = bench.domain.refusal
    metrics, samples = {}, {}
    m, samples["forget_qa"] = eval_open_qa(model, fmt, data["forget_qa"], sys_k[1], config, refusal, "forget QA")
    metrics.update(forget=m["recall"], forget_f1=m["f1"], forget_refusal=m["refusal"])
    m, samples["retain_qa"] = eval_open_qa(model, fmt, data["retain_qa"], sys_k[1], config, refusal, "general QA")
    metrics.update(general=m["recall"], general_f1=m["f1"], general_refusal=m["refusal"])
    m, samples["neighbor_mcq"] = eval_mcq(model, fmt, data["neighbor_mcq"], sys_k[2], config, "neighbour MCQ")
    metrics.update(neighbor_acc=m["accuracy"], neighbor_refusal=m.get("refusal", 0.0))
    m, samples["prefill"] = eval_prefill(model, fmt, data["prefill"], sys_k[3], config, judge)
    metrics.update(m)
    if "utility_mcq" in data:
        m, samples["utility_mcq"] = eval_mcq(model, fmt, data["utility_mcq"], sys_k[1], config, "utility MCQ")
        metrics["utility"] = m["accuracy"]
    if config.mmlu:
        from mule.mmlu import mmlu_accuracy
        metrics["mmlu"] = mmlu_accuracy(model, tokenizer, sys_k[1], config.batch_size)
    for name, rows in samples.items():
        write_jsonl(out / "samples" / f"{name}.jsonl", rows)
    result = {"system": config.system, "model": description, "benchmark": str(bench.root),
              "metrics": metrics, "counts": {n: len(v) for n, v in data.items()},
              "seconds": round(time.time() - started, 1), "config": asdict(config)}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "metrics.json")  # last and atomic: a metrics.json is always complete
    return out

