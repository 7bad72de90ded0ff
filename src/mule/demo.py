"""`mule demo`: the whole pipeline, offline, on a CPU, with the embedded SmolLM2-135M and the bundled benchmark.

1. target preparation (`mule prepare`, cached after the first run);
2. evaluation of the in-context systems: base, ensemble, oracle (the upper bound);
3. training and evaluation of our method and the baselines;
4. report.md, results.csv, results.json and radar.png in one folder, and the total time.
`--quick` is a smoke run: a few steps and items of everything, into the output folder only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mule.compare import GridConfig, GridMethod, run_compare
from mule.config import ModelConfig, TrainConfig
from mule.prepare import PrepareConfig, run_prepare

DEMO_METHODS = ["bitopk", "sft", "duet"]


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    quick: bool = False
    model: str = "smollm2-135m"
    benchmark: str = "hp"
    methods: list[str] = field(default_factory=lambda: list(DEMO_METHODS))
    eval_limit: int | None = 60  # items per evaluation file
    max_per_file: int | None = 48  # training records per train file
    lr: float = 2e-4
    epochs: int = 1


def _sizes(config: DemoConfig) -> dict:
    if config.quick:
        return {"limit": 4, "per_file": 4, "steps": 2, "prep_steps": 4, "new_tokens": 8}
    return {"limit": config.eval_limit, "per_file": config.max_per_file, "steps": None, "prep_steps": None,
            "new_tokens": 32}


def demo_grid(config: DemoConfig, prepared: Path) -> GridConfig:
    size = _sizes(config)
    prompts = {"prompt_set": "small", "cot": False}  # the prompts the target was prepared with
    train = {"epochs": config.epochs, "batch_size": 8, "lr": config.lr, "warmup_steps": 2, "max_steps": size["steps"]}
    return GridConfig(
        benchmark=config.benchmark, model=str(prepared), output_dir=config.output_dir,
        title="mule demo: unlearning the Harry Potter books from SmolLM2-135M-Instruct",
        methods=[GridMethod(m, {"method": {"name": m}}) for m in config.methods],
        unlearn_defaults={"model": {"max_length": 2048}, "teacher": {**prompts, "max_new_tokens": size["new_tokens"]},
                          "data": {"max_per_file": size["per_file"]}, "train": train},
        eval={**prompts, "limit": size["limit"], "max_new_tokens": 2 * size["new_tokens"],
              "prefill_max_new_tokens": 2 * size["new_tokens"]},
        notes=[f"Target preparation was used: the base row is `{config.model}` after `mule prepare` "
               f"(facts of the benchmark + intention-prompt following), model folder `{prepared}`.",
               "Intention prompts: the short set (prompt_set small, no chain of thought).",
               f"Evaluation: the first {size['limit'] or 'all'} items of each file."])


def run_demo(config: DemoConfig) -> dict[str, Path]:
    started = time.time()
    size = _sizes(config)
    prep = PrepareConfig(benchmark=config.benchmark, model=ModelConfig(name=config.model),
                         train=TrainConfig(epochs=1, batch_size=8, lr=2e-4, warmup_steps=10, save_every=25,
                                           group_by_length=True, max_steps=size["prep_steps"]),
                         output_dir=str(Path(config.output_dir) / "prepared") if config.quick else None)
    prepared = run_prepare(prep, ["demo"])
    files = run_compare(demo_grid(config, prepared))
    minutes, seconds = divmod(int(time.time() - started), 60)
    print(f"mule demo finished in {minutes} min {seconds} s")
    return files
