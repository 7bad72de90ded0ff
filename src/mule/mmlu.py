"""MMLU through lm-evaluation-harness on the in-memory model (METHOD_SPEC 5.4): 0-shot acc, 57 subjects.

Optional: needs `pip install "mule[mmlu]"` (lm-eval) and the `cais/mmlu` dataset, from the hub or the local
Hugging Face cache. In-context systems pass their system prompt as lm-eval's `system_instruction`.
"""

from __future__ import annotations

from mule.errors import MuleError


def mmlu_accuracy(model, tokenizer, system: str | None = None, batch_size: int = 16) -> float:
    """0-shot MMLU accuracy in percent, chat template off (the harness's default for log-likelihood tasks)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MuleError("MMLU needs lm-eval: pip install 'mule[mmlu]' (or pip install lm-eval)") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=["mmlu"], num_fewshot=0, system_instruction=system)
    except Exception as err:  # dataset download / cache errors surface as many exception types
        raise MuleError(f"MMLU could not be evaluated (is the cais/mmlu dataset reachable or cached?): {err}") from None
    return 100.0 * float(results["results"]["mmlu"]["acc,none"])
