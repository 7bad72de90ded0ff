"""`mule unlearn` end to end on the tiny random model: run directory, plain-peft loading, invariants, errors."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mule import train as train_module
from mule.cli import main
from mule.config import load_config
from mule.errors import MuleError
from mule.train import run_unlearn


def overrides(tiny_model, bench, out, *extra):
    return [f"model.name={tiny_model}", f"benchmark={bench}", f"output_dir={out}", "train.epochs=2",
            "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=2", "teacher.max_new_tokens=6",
            "model.max_length=1024", "teacher.leaks=keep", *extra]  # the random tiny model never refuses


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_unlearn_writes_a_run_directory_that_plain_peft_loads(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["unlearn", *overrides(tiny_model, tiny_bench, out)]) == 0
    assert f"run written to {out}" in capsys.readouterr().out
    for name in ("config.yaml", "train_log.jsonl", "teacher_targets.jsonl", "result.json",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and len(log) == 10  # 19 examples, 5 batches x 2
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in log)
    config = (out / "config.yaml").read_text()
    assert "seed: 42" in config and "transformers:" in config and "command:" in config
    targets = [json.loads(line) for line in (out / "teacher_targets.jsonl").read_text().splitlines()]
    assert {t["id"] for t in targets} == {"f1", "f2", "f3", "f4", "a1", "a2", "p1", "p3", "p5"}  # refuse-type only

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero


def test_finished_run_is_refused_unless_overwrite(tiny_model, tiny_bench, tmp_path, capsys):
    out = tmp_path / "run"
    args = overrides(tiny_model, tiny_bench, out, "train.max_steps=1")
    assert main(["unlearn", *args]) == 0
    assert main(["unlearn", *args]) == 2
    assert "already holds a finished run; pass overwrite=true" in capsys.readouterr().err
    assert (out / "adapter").is_dir()  # nothing already written is lost
    assert main(["unlearn", *args, "overwrite=true"]) == 0


def test_resume_gives_the_same_weights(tiny_model, tiny_bench, tmp_path, interrupt_after_checkpoint):
    """Interrupt after the step-4 checkpoint, rerun the same command: same final adapter as one uninterrupted run."""
    full = run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / "full", "train.save_every=2")))
    args = overrides(tiny_model, tiny_bench, tmp_path / "cut", "train.save_every=2")
    arm, disarm = interrupt_after_checkpoint
    arm(4)
    with pytest.raises(KeyboardInterrupt):
        run_unlearn(load_config(None, args))
    assert not (tmp_path / "cut" / "result.json").exists()
    disarm()
    resumed = run_unlearn(load_config(None, args))
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_gradient_accumulation_invariant(tiny_model, tiny_bench, tmp_path):
    """Batch 8 in one micro-batch equals batch 8 as 2 micro-batches of 4 (and as 4 of 2)."""
    runs = [run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / f"acc{a}", "train.batch_size=8",
                                                    f"train.grad_accum={a}", "train.max_steps=3")))
            for a in (1, 2, 4)]
    ref = adapter(runs[0])
    for other in runs[1:]:
        got = adapter(other)
        assert all(torch.allclose(ref[k], got[k], atol=1e-6) for k in ref)
    logs = [[json.loads(x)["loss"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in runs]
    assert logs[1] == pytest.approx(logs[0], rel=1e-5) and logs[2] == pytest.approx(logs[0], rel=1e-5)


def test_full_finetuning_with_a_frozen_teacher_copy(tiny_model, tiny_bench, tmp_path):
    out = run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / "full", "lora.enabled=false",
                                                  "train.max_steps=2", "teacher.cache_prefix=false")))
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_duet_first_position_variant_runs(tiny_model, tiny_bench, tmp_path):
    """DUET's original: only each example's first response position. Every method's two-step run, with the
    passes it needs, is in tests/test_baselines.py."""
    out = run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / "duet", "method.name=duet",
                                                  "train.max_steps=2", "method.positions=first")))
    assert json.loads((out / "result.json").read_text())["steps"] == 2


def test_prefix_cache_does_not_change_training(tiny_model, tiny_bench, tmp_path):
    runs = [run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / f"c{c}", "train.max_steps=3",
                                                    f"teacher.cache_prefix={c}"))) for c in ("true", "false")]
    a, b = adapter(runs[0]), adapter(runs[1])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tiny_model, tiny_bench, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_module.bind_loss

    def poisoned(config):
        loss_fn = real(config)

        def wrapped(**inputs):
            calls["n"] += 1
            loss, metrics = loss_fn(**inputs)
            return (loss * float("nan") if calls["n"] > 2 else loss), metrics
        return wrapped

    monkeypatch.setattr(train_module, "bind_loss", poisoned)
    cfg = load_config(None, overrides(tiny_model, tiny_bench, tmp_path / "nan", "train.save_every=2"))
    with pytest.raises(MuleError, match="non-finite loss or gradient at step 3.*last good checkpoint"):
        run_unlearn(cfg)
    assert json.loads((tmp_path / "nan" / "checkpoint" / "step.json").read_text())["step"] == 2
    assert not (tmp_path / "nan" / "result.json").exists()


def test_bad_input_gives_clear_errors_without_traceback(tiny_model, tiny_bench, tmp_path, capsys):
    base = overrides(tiny_model, tiny_bench, tmp_path / "e")
    cases = [
        (["method.name=bitopc"], "unknown method 'bitopc'. Did you mean 'bitopk'?"),
        (["train.batchsize=2"], "Did you mean 'batch_size'?"),
        (["data.files=[forget]", "method.objectives=[2]"], "the training set is empty"),
        (["model.max_length=40", "model.on_overflow=error"], "more than model.max_length=40"),
        ([f"benchmark={tmp_path / 'nowhere'}"], "neither a folder nor a bundled benchmark"),
    ]
    for extra, message in cases:
        assert main(["unlearn", *base, *extra, "overwrite=true"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    (tiny_bench / "train" / "forget.jsonl").write_text('{"id": "f1", "objective": 1, "role": "forget"}\n')
    assert main(["unlearn", *base, "overwrite=true"]) == 2
    assert "forget.jsonl:1: missing required field(s): question, answer" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["bitopk", "mollm"])
def test_two_process_cpu_run_matches_one_process(tiny_model, tiny_bench, tmp_path, method):
    """torchrun with 2 gloo processes: each takes half of every batch; the result equals a single process.
    MOLLM all-reduces each objective's gradient separately before combining them."""
    single = run_unlearn(load_config(None, overrides(tiny_model, tiny_bench, tmp_path / "one", "train.max_steps=3",
                                                     f"method.name={method}")))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m",
           "mule.cli", "unlearn", *overrides(tiny_model, tiny_bench, tmp_path / "two", "train.max_steps=3",
                                             f"method.name={method}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = adapter(single), adapter(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_sft_trains_on_refusals_for_forget_records_and_gold_answers_elsewhere(tiny_model, tiny_bench, tmp_path,
                                                                              single_process):
    from mule.refusal import is_refusal
    from mule.targets import refusal_templates
    from mule.train import setup

    refusal = "I'm sorry, but I don't have any knowledge about that topic."
    templates = refusal_templates(refusal)
    for mode in ("templates", "domain"):
        cfg = load_config(None, overrides(tiny_model, tiny_bench, tmp_path / mode, "method.name=sft",
                                          f"method.refusals={mode}"))
        (tmp_path / mode).mkdir()
        _, tok, fmt, _, examples, summary = setup(cfg, tmp_path / mode, single_process)
        by_id = {e.id: tok.decode(e.response, skip_special_tokens=True).strip() for e in examples}
        refused = [by_id[i] for i in ("f1", "f2", "f3", "f4", "a1", "a2", "p1", "p3", "p5")]
        assert summary == {"teacher_target_refusal_share": None, "teacher_leaks_dropped": 0}
        assert all(is_refusal(t, refusal) for t in refused)
        assert by_id["r1"] == "Helsinki." and by_id["p2"] == "About 1,500 kilograms."
        if mode == "domain":
            assert set(refused) == {refusal}
        else:  # METHOD_SPEC 4.4: refusals drawn from about 20 phrasings, deterministically per record
            assert set(refused) <= set(templates) and len(set(refused)) >= 3 and len(templates) == 20


def test_refuse_type_records_whose_teacher_target_leaks_are_left_out():
    from mule.records import QARecord
    from mule.train import drop_leaks

    refusal = "I'm sorry, but I don't have any knowledge about that topic."
    records = [QARecord("f1", 1, "forget", "Who is Harry's owl?", "Hedwig."),
               QARecord("f2", 1, "forget", "Where does Harry live?", "Privet Drive."),
               QARecord("p1", 3, "forget", "Who is Ron's rat?", "Scabbers.", prefill="Sure, here it is:"),
               QARecord("r1", 1, "retain", "Capital of Finland?", "Helsinki.")]
    targets = {"f1": "Hedwig, a snowy owl.", "f2": refusal, "p1": " I'm sorry, I can't help with that.",
               "r1": "Helsinki."}
    kept, dropped = drop_leaks(records, targets, load_config(None, []), refusal)
    assert [r.id for r in kept] == ["f2", "p1", "r1"] and dropped == 1
    assert drop_leaks(records, targets, load_config(None, ["teacher.leaks=keep"]), refusal) == (records, 0)
    # gold-answer targets are not generated by the teacher: nothing to check, nothing left out
    gold = load_config(None, ["method.forget_target=gold_answer"])
    assert drop_leaks(records, targets, gold, refusal) == (records, 0)
    with pytest.raises(MuleError, match="teacher.leaks"):
        drop_leaks(records, targets, load_config(None, ["teacher.leaks=filter"]), refusal)
    with pytest.raises(MuleError, match="refused none"):
        drop_leaks(records[:1], targets, load_config(None, []), refusal)
