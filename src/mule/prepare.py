"""`mule prepare`: make a small base model into a target that knows the benchmark and follows intention prompts.

A 135M model knows little of any domain and ignores a system prompt that tells it to forget one, so, as TOFU
fine-tunes its target model, a benchmark's target is prepared once (DESIGN.md, "target preparation"):
- knowledge: the benchmark's `prepare/*.jsonl` (its facts restated in other words than the evaluation questions),
  asked with no system prompt: `knowledge_epochs` epochs of them alone first (a 135M model needs several passes
  to learn a fact well enough to answer a differently worded question about it), then `knowledge_repeats` copies
  mixed into the intention-following examples, so the facts are not forgotten while prompts are learnt;
- intention following, learnt on a curriculum of *other* topics (never the benchmark's domain): under an
  intention prompt p_k about topic T, questions about T get the refusal sentence (also after a prefilled
  affirmative opening), questions about other topics get their answers; with no prompt, everything is answered;
- optional hard negatives for the benchmark's own prompts: its train neighbour and retain records answered under
  p_1/p_2 (off: measured, they teach the model to answer everything near the domain under its prompt, and the
  refusals of the domain fall from 72% to 3%; docs/performance.md). Its forget records are never used here:
  refusing the domain under its prompt must come from generalisation.
The result is the base model with a LoRA adapter merged in, saved as safetensors; use it as `model.name`.

Preparing takes about 2 h 45 min on a 2-core CPU (3 minutes on a GPU), so the adapter it made for the embedded
model and the bundled benchmark ships with the package (`mule/data/prepared/`, fp16): with `use_shipped=true` (what `mule demo` does)
it is merged instead of trained. `export_to=DIR` writes a freshly trained adapter in that shipped form.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from mule.batching import TokenizedExample
from mule.benchmark import Benchmark, Domain, load_benchmark
from mule.chat import ChatFormatter
from mule.config import LoraConfig, MethodConfig, ModelConfig, TrainConfig, UnlearnConfig
from mule.errors import MuleError
from mule.models import cache_dir
from mule.prompts import intention_prompts

# Bumped when the examples built from the same config change: 2 = responses end with the chat template's
# end-of-turn token (1 used the tokenizer's eos, which transformers 5.17 reads from SmolLM2's GGUF as <|im_start|>).
RECIPE_VERSION = 2
SHIPPED = Path(str(resources.files("mule") / "data" / "prepared"))  # <model>-<benchmark>/ adapters made by export_to

PREFILLS = ("Sure, here is the answer:", "Of course! The answer is", "Absolutely. Here are the details:",
            "Great question!", "Sure thing. In short,", "Here is what I know:")


@dataclass
class PrepareConfig:
    benchmark: str = "hp"
    output_dir: str | None = None  # default: <mule cache>/prepared/<model>-<benchmark>
    overwrite: bool = False
    curriculum: str | None = None  # JSON {topic: {description, qa: [{question, answer}]}}; default: bundled
    train_topics: int = 24  # the first N curriculum topics teach prompt following; the rest stay held out
    prefill_share: float = 0.15  # share of p_1/p_2 examples whose assistant turn opens with an affirmative prefix
    answers_per_question: int = 2  # per curriculum question, other topics' questions answered under its prompts
    no_prompt_share: float = 0.25  # per curriculum question, chance of an extra example with no system prompt
    use_shipped: bool = False  # merge the adapter shipped for this model and benchmark instead of training
    export_to: str | None = None  # also write the trained adapter here, in the shipped form (fp16)
    knowledge: bool = True  # the benchmark's facts, asked with no prompt, so the target knows what is to be forgotten
    knowledge_epochs: int = 0  # epochs over the restated facts alone, before the mixed examples (measured: they
    # teach the most facts, but the prepared model then ignores its forget prompt; docs/performance.md, attempts 6-7)
    knowledge_lr_scale: float = 2.0  # those epochs run at train.lr times this
    knowledge_repeats: int = 3  # copies of each restated fact among the mixed examples (more: more knowledge, fewer
    # refusals under the prompt; docs/performance.md, attempt 7)
    hard_negatives: bool = False  # answer the benchmark's own neighbour/retain train questions under its prompts
    prompts: dict[int, str] = field(default_factory=dict)  # intention prompt overrides, as in `mule unlearn`
    prompt_set: str = "small"  # the short prompts: a small model cannot use the paper's long CoT prompts
    cot: bool = False
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="float32"))  # fp32 on any device: one
    # recipe on a CPU and a GPU (the same steps; the adapters differ only by each device's rounding)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=1e-3, warmup_steps=20,
                                                                   save_every=25, group_by_length=True))


@dataclass(frozen=True)
class Turn:
    """One supervised example: (system, question, prefill) -> response."""

    system: str | None
    question: str
    response: str
    prefill: str | None = None
    source: str = ""


def load_curriculum(path: str | None) -> dict[str, dict]:
    text = curriculum_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise MuleError(f"{path or 'bundled curriculum'}: not valid JSON ({err.msg})") from None
    for topic, entry in data.items():
        if not isinstance(entry, dict) or "description" not in entry or not entry.get("qa"):
            raise MuleError(f"{path or 'bundled curriculum'}: topic {topic!r} needs 'description' and a 'qa' list")
    return data


def curriculum_turns(curriculum: dict[str, dict], config: PrepareConfig, refusal: str, rng: random.Random) -> list[Turn]:
    """Intention-following examples over the first `train_topics` topics (the prompts of METHOD_SPEC 2.2).

    Per question of topic T: the refusal under each of T's prompts p_1, p_2, p_3 (p_3 always after a prefilled
    affirmative opening, p_1/p_2 with probability `prefill_share`); `answers_per_question` questions of other
    topics answered under T's prompts; T's look-alikes (questions sharing a word with T but about something
    else, the topic's optional "lookalike" list) answered under p_1 and p_2; with probability `no_prompt_share`
    the question answered with no system prompt. p_2 names the topic's optional "neighbors" (else three other
    curriculum topics).
    """
    topics = list(curriculum)[: config.train_topics]
    if config.train_topics and len(topics) < 2:
        raise MuleError("the curriculum needs at least two training topics")
    turns = []
    for topic in topics:
        others = [t for t in topics if t != topic]
        neighbors = curriculum[topic].get("neighbors") or rng.sample(others, min(3, len(others)))
        domain = Domain(topic, curriculum[topic]["description"], list(neighbors), refusal=refusal)
        prompts = intention_prompts(domain, config.prompts, config.cot, config.prompt_set)

        def prefill_for(k: int) -> str | None:
            return rng.choice(PREFILLS) if k == 3 or rng.random() < config.prefill_share else None

        for qa in curriculum[topic]["qa"]:
            for k in (1, 2, 3):
                turns.append(Turn(prompts[k], qa["question"], refusal, prefill_for(k), f"refuse:{topic}"))
            for _ in range(config.answers_per_question):
                other = rng.choice(curriculum[rng.choice(others)]["qa"])
                k = rng.choice((1, 2, 3))
                turns.append(Turn(prompts[k], other["question"], other["answer"], prefill_for(k),
                                  f"answer-under:{topic}"))
            if rng.random() < config.no_prompt_share:
                turns.append(Turn(None, qa["question"], qa["answer"], None, "no-prompt"))
        for qa in curriculum[topic].get("lookalike", []):
            for k in (1, 2):
                turns.append(Turn(prompts[k], qa["question"], qa["answer"], prefill_for(k), f"lookalike:{topic}"))
    return turns


def knowledge_turns(bench: Benchmark) -> list[Turn]:
    """The benchmark's restated facts (`prepare/*.jsonl`), each once, asked with no system prompt."""
    turns = []
    for path in sorted((bench.root / "prepare").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                turns.append(Turn(None, row["question"], row["answer"], None, f"knowledge:{path.stem}"))
    return turns


def negative_turns(bench: Benchmark, config: PrepareConfig, rng: random.Random) -> list[Turn]:
    """Hard negatives: the benchmark's train neighbour and retain records answered under its own p_1 / p_2."""
    turns = []
    if config.hard_negatives:
        prompts = intention_prompts(bench.domain, config.prompts, config.cot, config.prompt_set)
        for record in bench.train(("neighbor", "retain")):
            turns.append(Turn(prompts[rng.choice((1, 2))], record.question, record.answer, None, f"negative:{record.role}"))
    return turns


def tokenize_turns(turns: list[Turn], fmt: ChatFormatter, name: str = "prep") -> list[TokenizedExample]:
    """The system part goes into the body: prepared examples each carry their own system prompt."""
    return [TokenizedExample(f"{name}-{i}", 1, fmt.prefix_ids(t.system) + fmt.body_ids(t.question, t.prefill),
                             fmt.response_ids(t.response, t.prefill)) for i, t in enumerate(turns)]


def slug(config: PrepareConfig) -> str:
    name = f"{Path(config.model.name).name}-{Path(config.benchmark).name}"  # model and benchmark: names or folders
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def default_output(config: PrepareConfig) -> Path:
    return cache_dir() / "prepared" / slug(config)


def curriculum_text(path: str | None) -> str:
    return (Path(path).read_text(encoding="utf-8") if path else
            (resources.files("mule") / "data" / "intention_curriculum.json").read_text(encoding="utf-8"))


def recipe(config: PrepareConfig) -> dict:
    """What determines a prepared model: the config less where it goes and how it is obtained (as JSON reads it),
    plus a hash of the curriculum's and the benchmark domain's text, so that editing either one prepares again."""
    bench = load_benchmark(config.benchmark)
    digest = hashlib.sha256(curriculum_text(config.curriculum).encode("utf-8"))
    digest.update(json.dumps(asdict(bench.domain), sort_keys=True).encode("utf-8"))
    return json.loads(json.dumps(asdict(config) | {"output_dir": None, "overwrite": False, "export_to": None,
                                                   "use_shipped": False, "data_sha256": digest.hexdigest()[:16],
                                                   "version": RECIPE_VERSION}))


def shipped_adapter(config: PrepareConfig) -> Path | None:
    """The package's adapter for this model and benchmark, if one ships and was made with this very recipe."""
    folder = SHIPPED / slug(config)
    if not (folder / "adapter_model.safetensors").is_file():
        return None
    made_with = json.loads((folder / "prepared.json").read_text(encoding="utf-8"))["config"]
    return folder if made_with == recipe(config) else None


def run_prepare(config: PrepareConfig, argv: list[str] | None = None) -> Path:
    """Fine-tune (or take the shipped adapter) and merge; returns the folder of the prepared model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from mule.models import load_model, load_tokenizer, pick_dtype
    from mule.rundir import open_run_dir
    from mule.train import fit

    out = Path(config.output_dir) if config.output_dir else default_output(config)
    made = out / "model" / "prepared.json"
    if made.is_file() and not config.overwrite:
        if json.loads(made.read_text(encoding="utf-8")).get("recipe") == recipe(config):
            return out / "model"
        print(f"target preparation: {out / 'model'} was made with another recipe; preparing again")
        config = replace(config, overwrite=True)
    shipped = shipped_adapter(config) if config.use_shipped else None
    if shipped is not None:
        print(f"target preparation: merging the shipped adapter {shipped}")
        return merge(config, shipped, out / "model")
    run = UnlearnConfig(benchmark=config.benchmark, output_dir=str(out / "run"), overwrite=config.overwrite,
                        model=config.model, lora=config.lora, method=MethodConfig(name="sft"), train=config.train)
    accelerator = Accelerator()
    run_dir = open_run_dir(run, accelerator, argv)
    set_seed(config.train.seed)
    bench = load_benchmark(config.benchmark)
    rng = random.Random(config.train.seed)
    turns = curriculum_turns(load_curriculum(config.curriculum), config, bench.domain.refusal, rng)
    turns += negative_turns(bench, config, rng)
    facts = knowledge_turns(bench) if config.knowledge else []
    turns += facts * config.knowledge_repeats
    tokenizer = load_tokenizer(config.model.name, config.model.trust_remote_code)
    model = load_model(config.model.name, pick_dtype(config.model.dtype, accelerator.device),
                       config.model.trust_remote_code).to(accelerator.device)
    fmt = ChatFormatter(tokenizer)
    examples = tokenize_turns(turns, fmt)
    counts = {}
    for t in turns:
        kind = t.source.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    if facts and config.knowledge_epochs:
        counts["knowledge_lead_in"] = len(facts) * config.knowledge_epochs
    if not (run_dir / "result.json").is_file():
        fit(run, run_dir, accelerator, model, tokenizer, examples, [], {}, {}, {"turns": counts},
            lead_in=(tokenize_turns(facts, fmt, "fact"), config.knowledge_epochs, config.knowledge_lr_scale))
    if config.export_to:
        export_adapter(config, run_dir, Path(config.export_to))
    return merge(config, run_dir / "adapter", out / "model")


def export_adapter(config: PrepareConfig, run_dir: Path, dest: Path) -> Path:
    """The trained adapter in the shipped form: fp16 safetensors, its peft config, and how it was made."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in weights.items()}, str(dest / "adapter_model.safetensors"))
    shutil.copyfile(run_dir / "adapter" / "adapter_config.json", dest / "adapter_config.json")
    result = json.loads((run_dir / "result.json").read_text(encoding="utf-8"))
    (dest / "prepared.json").write_text(json.dumps(
        {"config": recipe(config), "device": device_name(),
         "steps": result["steps"], "examples": result["examples"], "turns": result.get("turns"),
         "seconds": result["seconds"]}, indent=2) + "\n", encoding="utf-8")
    return dest


def device_name() -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def merge(config: PrepareConfig, adapter: Path, target: Path) -> Path:
    """Base + adapter merged into plain weights, written as safetensors next to the tokenizer."""
    from peft import PeftModel

    from mule.models import load_model, load_tokenizer

    model = PeftModel.from_pretrained(load_model(config.model.name), adapter).merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(config.model.name).save_pretrained(tmp)
    (tmp / "prepared.json").write_text(json.dumps({"base": config.model.name, "benchmark": config.benchmark,
                                                   "adapter": str(adapter), "recipe": recipe(config)}, indent=2))
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target
