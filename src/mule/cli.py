"""The `mule` command line. Each stage reads and writes files; see `mule --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from mule.errors import MuleError

EPILOG = "Options of a config can be overridden as dotted key=value pairs, e.g. train.lr=1e-4 method.k=20."


def cmd_unlearn(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.methods import get_method
    from mule.train import run_unlearn

    config = load_config(args.config, args.overrides)
    get_method(config.method.name)  # fail fast, before any model is loaded
    run_dir = run_unlearn(config, sys.argv[1:])
    print(f"run written to {run_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.demo import DemoConfig, run_demo

    overrides = (["quick=true"] if args.quick else []) + args.overrides
    files = run_demo(load_config(None, overrides, DemoConfig))
    print(files["report.md"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.prepare import PrepareConfig, run_prepare

    path = run_prepare(load_config(args.config, args.overrides, PrepareConfig), sys.argv[1:])
    print(f"prepared model written to {path} (use it as model.name / --model)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.evaluate import EvalConfig, run_eval

    flags = {"model": args.model, "benchmark": args.benchmark, "system": args.system, "run": args.run,
             "output_dir": args.output}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    out = run_eval(load_config(args.config, overrides, EvalConfig))
    result = json.loads((out / "metrics.json").read_text())
    print(f"{result['system']} system, {result['model']}: " +
          ", ".join(f"{k} {v:.1f}" for k, v in result["metrics"].items() if isinstance(v, float)))
    print(f"metrics and samples written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mule.compare import report_rows, rows_from_dirs

    files = report_rows(rows_from_dirs(args.evals), Path(args.output), args.title)
    print(files["report.md"].read_text() if "report.md" in files else "")
    print(f"report written to {args.output}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mule.compare import GridConfig, run_compare
    from mule.config import load_config

    files = run_compare(load_config(args.config, args.overrides, GridConfig))
    print(files["report.md"].read_text())
    print("report written to " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_gradsim(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.gradsim import GradsimConfig, run_gradsim

    flags = {"model.name": args.model, "benchmark": args.benchmark, "output_dir": args.output}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    files = run_gradsim(load_config(args.config, overrides, GradsimConfig))
    print(files["gradsim.md"].read_text())
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0


def _print_summary(summary: dict) -> None:
    print(json.dumps(summary, indent=2, ensure_ascii=False))


def cmd_data(args: argparse.Namespace) -> int:
    from mule.config import load_config
    from mule.datagen import COMMANDS, DataGenConfig

    flags = [f"benchmark={args.output}"] if args.output else []
    if args.source:
        flags.append("qa.sources=" + json.dumps(args.source))
    summary = COMMANDS[args.data_command](load_config(args.config, flags + args.overrides, DataGenConfig))
    _print_summary(summary)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from mule.attack import AttackConfig, run_attack
    from mule.config import load_config

    flags = {"benchmark": args.benchmark, "model": args.model, "run": args.run, "output": args.output,
             "mode": args.mode}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    _print_summary(run_attack(load_config(args.config, overrides, AttackConfig)))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mule.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
        print(f"{'':<{width}}  paper: {method.paper}; teacher: {method.teacher}; needs: {', '.join(method.needs)}; "
              f"objectives: {', '.join(map(str, method.objectives))}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mule", description="Multi-objective unlearning of large language models.")
    top.add_argument("--version", action="version", version=f"mule {__import__('mule').__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unlearn", help="train a model to forget a benchmark's domain", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML config (defaults: bitopk on smollm2-135m with the hp benchmark)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=20")
    p.set_defaults(func=cmd_unlearn)
    p = sub.add_parser("demo", help="the whole pipeline offline on the embedded model: prepare, train, evaluate, report",
                       epilog=EPILOG)
    p.add_argument("--quick", action="store_true", help="a smoke run of a few steps and items")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. output_dir=runs/demo2 methods=[bitopk]")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("prepare", help="target preparation: teach a small model the benchmark and intention prompts",
                       epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML prepare config (defaults: smollm2-135m, hp, bundled curriculum)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("eval", help="evaluate a model, a run or an in-context system on a benchmark", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML eval config (optional)")
    p.add_argument("--model", help="hub id, folder or embedded name (default smollm2-135m)")
    p.add_argument("--run", help="a `mule unlearn` run directory to evaluate")
    p.add_argument("--benchmark", help="benchmark folder or bundled name (default hp)")
    p.add_argument("--system", help="base (default), ensemble or oracle")
    p.add_argument("--output", "-o", help="output folder (default runs/eval)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. limit=20 judge=llm llm.model=...")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("report", help="tabulate evaluation folders: markdown, CSV, JSON and a radar chart")
    p.add_argument("evals", nargs="+", help="folders written by `mule eval` (one must be the base system)")
    p.add_argument("--output", "-o", default="runs/report")
    p.add_argument("--title", default="mule results")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="train and evaluate a grid of methods, then report", epilog=EPILOG)
    p.add_argument("--config", "-c", required=True, help="grid YAML (see configs/compare_*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("gradsim", help="cosine similarity of the objectives' gradients, raw vs standardised data "
                       "(the paper's Figure 2)", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML gradsim config (see configs/gradsim_hp.yaml)")
    p.add_argument("--model", help="hub id, folder or embedded name (default smollm2-135m)")
    p.add_argument("--benchmark", help="benchmark folder or bundled name (default hp)")
    p.add_argument("--output", "-o", help="output folder (default runs/gradsim)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. layers=[last3,all] batches=4")
    p.set_defaults(func=cmd_gradsim)
    p = sub.add_parser("data", help="standardise data into a benchmark folder: qa, neighbors, anchors, mcq")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    for name, text in (("qa", "passages (text, JSONL, HF datasets) to QA records"),
                       ("neighbors", "neighbour concepts with reasons, then their QA"),
                       ("anchors", "contrastive anchor pairs for each objective"),
                       ("mcq", "neighbour MCQs with confusable options and a refusal option")):
        q = data_sub.add_parser(name, help=text, epilog=EPILOG)
        q.add_argument("--config", "-c", help="YAML data config (see configs/data_*.yaml)")
        q.add_argument("--output", "-o", help="benchmark folder to write (config key: benchmark)")
        if name == "qa":
            q.add_argument("--source", action="append", help="text file/folder, JSONL, hf:NAME or a preset; repeatable")
        q.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. generator.backend=local")
        q.set_defaults(func=cmd_data, source=None)
    p = sub.add_parser("attack", help="search adversarial prefilling prefixes against a model", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML attack config (see configs/attack_*.yaml)")
    p.add_argument("--benchmark", help="benchmark folder or bundled name (default hp)")
    p.add_argument("--model", help="target model (default smollm2-135m)")
    p.add_argument("--run", help="a `mule unlearn` run directory as target (adaptive mode)")
    p.add_argument("--mode", help="static (default) or adaptive")
    p.add_argument("--output", "-o", help="folder to write (static default: the benchmark folder)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=3 attacker.backend=local")
    p.set_defaults(func=cmd_attack)
    p = sub.add_parser("methods", help="list the unlearning methods")
    p.set_defaults(func=cmd_methods)
    return top


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    logging.basicConfig(level=logging.INFO, format="mule: %(message)s")
    for noisy in ("transformers", "accelerate", "peft", "httpx", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except MuleError as err:
        print(f"mule: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mule: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
