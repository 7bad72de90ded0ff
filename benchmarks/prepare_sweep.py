"""Sweep target-preparation recipes: `mule prepare` each variant, then evaluate it as `oracle` and `base`.

Each variant is a name and `mule prepare` overrides on top of `configs/prepare_hp.yaml`:

    python benchmarks/prepare_sweep.py --out runs/sweep --parallel 4 \\
        --variant "shipped" --variant "knowledge knowledge=true" --variant "two_epochs train.epochs=2"

Variants run as separate processes, `--parallel` at a time (GPU memory is no constraint for a 135M model; on a
CPU use 1). Per variant the prepared model is evaluated on the bundled benchmark with the short intention prompts,
fp32, 32 new tokens (as `mule demo` does); the summary (one JSON line per variant, and a table) lists what decides
whether a prepared target is usable: the oracle's forget refusal and ASR (Obj1, Obj3), its general and neighbour
refusal (Obj2: must stay low), and the base system's forget/general ROUGE and ASR (what it knows, so what there is
to forget). With `--export N` the adapters of the N best variants (`score`) are copied, in the shipped form, to
OUT/best<i>/. With `--deadline S` a variant still running S seconds after the start is stopped and left out, so
that a time-limited machine still returns the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULE = [sys.executable, "-m", "mule.cli"]
KEYS = ("forget_refusal", "asr", "general_refusal", "neighbor_refusal", "neighbor_acc", "utility", "forget",
        "general")


def run(cmd: list[str], log: Path, deadline: float) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                  timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(cmd[2:5])} ... stopped at the deadline; see {log}") from None
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... failed with {done.returncode}; see {log}")


def variant(spec: str, common: str, out: Path, limit: int | None, tokens: int, deadline: float) -> dict:
    name, *overrides = spec.split()
    overrides = common.split() + overrides  # the variant's own settings win
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    start = time.time()
    run(MULE + ["prepare", "--config", "configs/prepare_hp.yaml", f"output_dir={folder / 'prep'}",
                f"export_to={folder / 'adapter'}", *overrides], log, deadline)
    trained = time.time() - start
    row = {"variant": name, "overrides": overrides, "prepare_s": round(trained, 1)}
    for system in ("oracle", "base"):
        cmd = MULE + ["eval", "--config", "configs/eval_prepared.yaml", "--system", system,
                      "-o", str(folder / system), f"model={folder / 'prep' / 'model'}", "dtype=float32",
                      f"max_new_tokens={tokens}", f"prefill_max_new_tokens={tokens}", "overwrite=true"]
        run(cmd + ([f"limit={limit}"] if limit else []), log, deadline)
        metrics = json.loads((folder / system / "metrics.json").read_text())["metrics"]
        row[system] = {k: round(metrics[k], 1) for k in KEYS if k in metrics}
    made = json.loads((folder / "adapter" / "prepared.json").read_text())
    row["steps"], row["turns"] = made["steps"], made["turns"]
    row["seconds"] = round(time.time() - start, 1)
    return row


def score(row: dict) -> float:
    """Prompt following (oracle refusals where due and nowhere else, little leaked under prefilling) plus what the
    target knows of the domain (base forget ROUGE and ASR), less any general ROUGE below 60."""
    o, b = row["oracle"], row["base"]
    return (o["forget_refusal"] - 2 * o["general_refusal"] - o["neighbor_refusal"] - 0.5 * o["asr"]
            + b["forget"] + 0.5 * b["asr"] + min(0.0, b["general"] - 60.0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True, help='"name override=value ..."')
    parser.add_argument("--common", default="", help="overrides added to every variant (e.g. train.max_steps=2)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="items per eval file (default: all)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generated answer")
    parser.add_argument("--export", type=int, default=0, help="copy the adapters of the N best variants")
    parser.add_argument("--deadline", type=float, default=None, help="stop variants still running after S seconds")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    deadline = time.time() + (args.deadline if args.deadline else 1e9)
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(variant, spec, args.common, out, args.limit, args.tokens, deadline): spec
                   for spec in args.variant}
        for future in as_completed(futures):
            spec = futures[future]
            try:
                row = future.result()
            except Exception as err:  # one failed variant must not lose the others
                print(f"{spec}: {err}", flush=True)
                continue
            rows.append(row)
            with (out / "summary.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows.sort(key=score, reverse=True)
    head = "| variant | steps | prepare s | " + " | ".join(f"oracle {k}" for k in KEYS[:6]) + \
           " | base forget | base general | base asr |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        o, b = r["oracle"], r["base"]
        lines.append(f"| {r['variant']} | {r['steps']} | {r['prepare_s']} | " +
                     " | ".join(str(o.get(k, "-")) for k in KEYS[:6]) + f" | {b['forget']} | {b['general']} | {b['asr']} |")
    table = "\n".join(lines)
    print(table)
    (out / "summary.md").write_text(table + "\n")
    for i, r in enumerate(rows[: args.export]):
        shutil.copytree(out / r["variant"] / "adapter", out / f"best{i}", dirs_exist_ok=True)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
