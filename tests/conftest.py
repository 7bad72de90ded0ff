"""Shared fixtures: a tiny random Llama with its own tokenizer, and a tiny benchmark folder (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_BENCH = FIXTURES / "tiny_bench"


def bench_texts(root: Path) -> list[str]:
    texts = []
    for path in sorted(root.rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row.get("question", ""), row.get("answer", ""), row.get("prefill") or ""]
            texts += row.get("choices", [])
    return texts + [(root / "benchmark.yaml").read_text()]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from mule.prompts import COT_SUFFIX, PROMPTS
    from mule.tiny import build_tiny_model

    corpus = bench_texts(TINY_BENCH) + list(PROMPTS.values()) + [COT_SUFFIX, "You are a helpful assistant."]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus * 3)


@pytest.fixture()
def tiny_bench(tmp_path) -> Path:
    """A writable copy of the tiny benchmark folder."""
    dest = tmp_path / "bench"
    shutil.copytree(TINY_BENCH, dest)
    return dest


@pytest.fixture()
def one_torch_thread():
    """Generation with a tiny model is dominated by per-op overhead: on a shared 2-core machine two torch threads
    run these tests 10-20x slower than one (measured: 43 s vs 2.7 s for test_sampling_is_seeded)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def interrupt_after_checkpoint(monkeypatch):
    """arm(step): training raises KeyboardInterrupt right after saving the checkpoint of `step`; disarm() undoes it."""
    from mule import train as train_module

    real_save = train_module.save_checkpoint

    def arm(step: int) -> None:
        def save_then_die(run_dir, accelerator, model, optimizer, scheduler, saved_step):
            real_save(run_dir, accelerator, model, optimizer, scheduler, saved_step)
            if saved_step == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)

    def disarm() -> None:
        monkeypatch.setattr(train_module, "save_checkpoint", real_save)

    return arm, disarm


@pytest.fixture()
def single_process():
    """A stand-in for a one-process `accelerate.Accelerator`, enough for `mule.train.setup`."""
    import torch

    class Single:
        is_main_process = True
        device = torch.device("cpu")

        def wait_for_everyone(self):
            pass

    return Single()
