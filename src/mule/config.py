"""Typed configs: one complete YAML per experiment, dotted `key=value` overrides on the command line.

Every section is a dataclass; unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mule.errors import MuleError, did_you_mean


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # hub id, local folder, or an embedded model name
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False
    max_length: int = 1024  # teacher prompt + query + response, in tokens
    on_overflow: str = "truncate"  # truncate the response (with a warning) or "error"


@dataclass
class LoraConfig:
    enabled: bool = True  # false = full fine-tuning with a frozen teacher copy
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class MethodConfig:
    name: str = "bitopk"
    k: int = 10  # top-K of each index set (METHOD_SPEC 3.6)
    alpha: float = 1.0  # weight of the student-top-K (suppression) term
    beta: float = 1.0  # Smooth-L1 beta
    center: bool = False  # top-K distillation on log-probabilities (logsumexp subtracted) instead of raw logits
    tau: float = 3.0  # BiLD temperature
    positions: str = "all"  # all response positions, or "first" (DUET's original)
    forget_target: str = "teacher_generated"  # or gold_answer (METHOD_SPEC 3.3); pinned by the baselines
    objectives: list[int] | None = None  # None = the method's default: [1] for GA, SimNPO, FLAT, else [1, 2, 3]
    refusals: str = "templates"  # refusal targets (SFT, FLAT): templates (20 phrasings) or domain (its one sentence)
    # baselines (METHOD_SPEC 4); None = the method's default, written into the run's config.yaml
    retain_weight: float | None = None  # retain term: GradDiff 1, NPO 1, SimNPO 0.1, RMU 1200
    npo_beta: float | None = None  # beta of NPO (0.1) and SimNPO (0.7)
    gamma: float = 0.0  # SimNPO's reward margin
    divergence: str = "tv"  # FLAT: tv, kl, js or pearson
    layer: int = 7  # RMU: decoder layer (0-based) whose output is steered
    steering_coeff: float = 6.5  # RMU: norm of the random control vector
    auto_lr: bool = True  # NGDiff: GeN's adaptive learning rate
    auto_lr_every: int = 10  # NGDiff: probe the learning rate every this many steps


@dataclass
class TeacherConfig:
    prompts: dict[int, str] = field(default_factory=dict)  # override p_1, p_2, p_3 ({NAME}, {DESC}, ...)
    cot: bool = True  # append the silent chain-of-thought suffix
    prompt_set: str = "paper"  # paper (METHOD_SPEC 2.2) or small (short prompts for small models, with cot off)
    max_new_tokens: int = 48  # teacher-generated targets for refuse-type records
    generation_batch_size: int = 16
    cache_prefix: bool = True  # compute each intention prompt's keys/values once and reuse them
    leaks: str = "drop"  # drop | keep: refuse-type records whose generated target does not refuse (METHOD_SPEC 3.3)


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=lambda: ["forget", "retain", "neighbor", "adversarial", "anchors"])
    max_per_file: int | None = None  # cap each train file (first N records), for quick runs


@dataclass
class TrainConfig:
    epochs: int = 5
    max_steps: int | None = None  # stop after this many optimiser steps
    batch_size: int = 16  # examples per optimiser step, over all processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 50  # checkpoint every N optimiser steps (0 = only at the end)
    group_by_length: bool = False  # batches of similar length, ignoring objectives and anchor pairs


@dataclass
class UnlearnConfig:
    benchmark: str = "hp"
    output_dir: str = "runs/unlearn"
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert a YAML value against a type hint (int -> float allowed; None for Optional)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _coerce(value, next(o for o in options if o is not type(None)), where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise MuleError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, typing.get_args(hint)[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MuleError(f"{where} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(hint)
        return {_coerce(k, kt, where): _coerce(v, vt, where) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise MuleError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def build(cls: type, raw: Any, where: str = "config", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, on top of `base` (an instance) or the defaults; unknown keys raise
    with the nearest valid key. A nested section given in part keeps the rest of its parent's default for it
    (PrepareConfig's `train` default has lr 1e-3: `train.max_steps=3` must not bring TrainConfig's 1e-5)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MuleError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise MuleError(f"unknown option {where}.{key}.{did_you_mean(str(key), list(fields))} "
                            f"Valid in {where}: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            default = getattr(base, key) if base is not None else _default(fields[key])
            values[key] = build(hints[key], value, f"{where}.{key}", default)
        else:
            values[key] = _coerce(value, hints[key], f"{where}.{key}")
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def apply_override(raw: dict, override: str) -> None:
    """Apply one `a.b.c=value` override to a nested mapping (the value is parsed as YAML)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise MuleError(f"override {override!r} must look like key.sub=value")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MuleError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = UnlearnConfig) -> Any:
    """Read a YAML config (or start from defaults), apply overrides, validate into `cls`."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MuleError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise MuleError(f"{path}: not valid YAML ({err})") from None
    for override in overrides:
        apply_override(raw, override)
    return build(cls, raw)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
