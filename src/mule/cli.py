"""The `mule` command line. Each stage reads and writes files; see `mule --help`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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


def cmd_methods(args: argparse.Namespace) -> int:
    from mule.methods import METHODS

    width = max(len(n) for n in METHODS)
    for name, method in METHODS.items():
        print(f"{name:<{width}}  {method.summary}")
        print(f"{'':<{width}}  paper: {method.paper}; teacher: {method.teacher}; needs: {', '.join(method.needs)}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mule", description="Multi-objective unlearning of large language models.")
    top.add_argument("--version", action="version", version=f"mule {__import__('mule').__version__}")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unlearn", help="train a model to forget a benchmark's domain", epilog=EPILOG)
    p.add_argument("--config", "-c", help="YAML config (defaults: bitopk on smollm2-135m with the hp benchmark)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=20")
    p.set_defaults(func=cmd_unlearn)
    p = sub.add_parser("methods", help="list the unlearning methods")
    p.set_defaults(func=cmd_methods)
    return top


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    logging.basicConfig(level=logging.INFO, format="mule: %(message)s")
    for noisy in ("transformers", "accelerate", "peft", "httpx"):
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
