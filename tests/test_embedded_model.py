"""The embedded default model: GGUF -> cached safetensors, and `mule unlearn` on it (loads SmolLM2-135M)."""

import json

import pytest
import torch

from mule.cli import main
from mule.models import EMBEDDED, embedded_path, load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_embedded_model_converts_once_and_loads_from_safetensors():
    path = embedded_path("smollm2-135m")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert embedded_path("smollm2-135m") == path  # cached: no second conversion
    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and "smollm2-135m" in EMBEDDED
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])  # real weights, not a random init


def test_unlearn_on_the_embedded_model(tiny_bench, tmp_path):
    out = tmp_path / "run"
    assert main(["unlearn", f"benchmark={tiny_bench}", f"output_dir={out}", "train.max_steps=2",
                 "train.batch_size=4", "teacher.max_new_tokens=12", "train.lr=1e-4"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["final"]["loss"] > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(embedded_path("smollm2-135m"))
    assert isinstance(PeftModel.from_pretrained(base, out / "adapter"), PeftModel)


def test_generation_with_a_shared_prefix_equals_whole_prompts():
    """The intention prompt's keys/values computed once give the same greedy answers as whole prompts."""
    from mule.benchmark import load_benchmark
    from mule.chat import ChatFormatter
    from mule.generation import greedy_generate
    from mule.prompts import intention_prompts

    tok, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m")
    fmt = ChatFormatter(tok)
    prefix = fmt.prefix_ids(intention_prompts(load_benchmark("hp").domain)[1])
    bodies = [fmt.body_ids(q) for q in ("What is the capital of France?", "Who wrote Hamlet?",
                                        "What is the name of Harry Potter's owl?")]
    whole = greedy_generate(model, tok, [prefix + b for b in bodies], 16, batch_size=3, progress=False)
    shared = greedy_generate(model, tok, bodies, 16, batch_size=3, progress=False, prefix=prefix)
    assert shared == whole and all(whole)


def test_mcq_scoring_with_a_shared_prefix_equals_whole_prompts():
    from mule.chat import ChatFormatter
    from mule.mcq import last_token_logits

    tok, model = load_tokenizer("smollm2-135m"), load_model("smollm2-135m")
    fmt = ChatFormatter(tok)
    prefix = fmt.prefix_ids("Answer multiple-choice questions with one letter.")
    bodies = [fmt.body_ids(q) for q in ("Question: 2+2?\\nA. 4\\nB. 5", "Question: Capital of Italy?\\nA. Rome\\nB. Oslo\\nC. Lima")]
    whole = last_token_logits(model, [prefix + b for b in bodies], tok.pad_token_id, progress=False)
    shared = last_token_logits(model, bodies, tok.pad_token_id, progress=False, prefix=prefix)
    assert torch.allclose(whole, shared, atol=1e-3)
