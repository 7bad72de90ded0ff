"""Run directories: resolved config, train log, checkpoints, final weights, and the finished marker.

    config.yaml            resolved config with package versions, seed and the command line
    teacher_targets.jsonl  the teacher's generated targets (cache: a rerun does not regenerate them)
    train_log.jsonl        one line per optimiser step
    checkpoint/            trainable weights (safetensors), optimizer and scheduler state, step
    adapter/ or model/     the final LoRA adapter (loads with peft.PeftModel.from_pretrained) or full weights
    result.json            written last: its presence marks a finished run
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mule.config import to_dict
from mule.errors import MuleError

VERSIONED = ("mule", "torch", "transformers", "peft", "accelerate", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _comparable(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in ("overwrite",)}


def open_run_dir(config, accelerator, argv: list[str] | None = None) -> Path:
    """Create the run directory, refuse a finished one (unless overwrite), or prepare to resume."""
    run_dir = Path(config.output_dir)
    saved = run_dir / "config.yaml"
    if (run_dir / "result.json").is_file() and not config.overwrite:
        raise MuleError(f"{run_dir} already holds a finished run; pass overwrite=true or choose another output_dir")
    if accelerator.is_main_process:
        if config.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        if saved.is_file():
            previous = yaml.safe_load(saved.read_text(encoding="utf-8")).get("config", {})
            if _comparable(previous) != _comparable(to_dict(config)):
                raise MuleError(f"{run_dir} holds an unfinished run with a different config; pass overwrite=true "
                                "to start again or choose another output_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        if not saved.is_file():
            header = {"command": ["mule", *(argv if argv is not None else sys.argv[1:])],
                      "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
                      "seed": config.train.seed, "config": to_dict(config)}
            saved.write_text(yaml.safe_dump(header, sort_keys=False, allow_unicode=True), encoding="utf-8")
    accelerator.wait_for_everyone()
    return run_dir


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, accelerator, model, optimizer, scheduler, step: int) -> None:
    """Write checkpoint.tmp/ then swap it in, so an interruption never leaves a half checkpoint."""
    if accelerator.is_main_process:
        tmp, final = run_dir / "checkpoint.tmp", run_dir / "checkpoint"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        old = run_dir / "checkpoint.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(run_dir: Path, model, optimizer, scheduler) -> int:
    """Restore trainable weights, optimizer and scheduler; return the step to continue from (0 if none)."""
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "step.json").is_file():
        _truncate_log(run_dir, 0)
        return 0
    step = json.loads((ckpt / "step.json").read_text())["step"]
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _truncate_log(run_dir, step)
    print(f"resuming {run_dir} from step {step}", file=sys.stderr)
    return step


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint (they will be run again)."""
    path = run_dir / "train_log.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def save_weights(run_dir: Path, accelerator, model, tokenizer, lora: bool) -> None:
    if accelerator.is_main_process:
        if lora:
            model.save_pretrained(run_dir / "adapter", safe_serialization=True)
        else:
            model.save_pretrained(run_dir / "model", safe_serialization=True)
            tokenizer.save_pretrained(run_dir / "model")
    accelerator.wait_for_everyone()


def finish_run(run_dir: Path, accelerator, summary: dict) -> None:
    if accelerator.is_main_process:
        tmp = run_dir / "result.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(run_dir / "result.json")
        shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    accelerator.wait_for_everyone()
