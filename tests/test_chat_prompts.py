"""Chat formatting (separate prompt/response tokenisation, prefill, pinned date) and intention prompts."""

import pytest

from mule.benchmark import Domain
from mule.chat import DATE_STRING, ChatFormatter
from mule.errors import MuleError
from mule.models import load_tokenizer
from mule.prompts import COT_SUFFIX, ensemble_prompt, intention_prompts, system_prompt

DOMAIN = Domain(name="the Moomin books", description="Moomintroll and friends", neighbors=["Pippi", "hippos"])


@pytest.fixture(scope="module")
def fmt(tiny_model):
    return ChatFormatter(load_tokenizer(tiny_model))


def test_parts_concatenate_to_the_rendered_chat(fmt):
    enc = fmt.encode("Forget the Moomins.", "Who wrote the Moomin books?", None, "Tove Jansson.")
    text = fmt.tokenizer.decode(enc.prefix + enc.body + enc.response)
    assert text == ("<|im_start|>system\nForget the Moomins.<|im_end|>\n<|im_start|>user\nWho wrote the Moomin "
                    "books?<|im_end|>\n<|im_start|>assistant\nTove Jansson.<|im_end|>")
    assert enc.response[-1] == fmt.eos_id


def test_student_and_teacher_share_body_and_response(fmt):
    student = fmt.encode(None, "Where do the Moomins live?", "Sure, here is the answer:", "In Moominvalley.")
    teacher = fmt.encode("A long intention prompt.", "Where do the Moomins live?", "Sure, here is the answer:",
                         "In Moominvalley.")
    assert student.body == teacher.body and student.response == teacher.response
    assert student.prefix != teacher.prefix
    assert fmt.tokenizer.decode(student.prefix).endswith("You are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_prefill_opens_the_assistant_turn_and_the_answer_gets_a_space(fmt):
    enc = fmt.encode(None, "Q?", "Sure, here is the answer:", "Snufkin.")
    assert fmt.tokenizer.decode(enc.body).endswith("<|im_start|>assistant\nSure, here is the answer:")
    assert fmt.tokenizer.decode(enc.response) == " Snufkin.<|im_end|>"
    assert fmt.prompt_text(None, "Q?", "Sure:").endswith("assistant\nSure:")


def test_date_is_pinned(fmt):
    tok = fmt.tokenizer
    old = tok.chat_template
    tok.chat_template = "Today {{ date_string }}|{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    try:
        assert ChatFormatter(tok).split(None)[0] == f"Today {DATE_STRING}|"
    finally:
        tok.chat_template = old


def test_intention_prompts_are_filled():
    prompts = intention_prompts(DOMAIN)
    assert set(prompts) == {1, 2, 3}
    for text in prompts.values():
        assert "the Moomin books" in text and "Moomintroll and friends" in text and "{" not in text
        assert text.endswith("write only your final reply.")
    assert "Pippi, hippos" in prompts[2]
    assert "I'm sorry, but I don't have any knowledge about that topic." in prompts[1]


def test_ensemble_joins_all_prompts_with_cot_once():
    text = ensemble_prompt(DOMAIN)
    bare = intention_prompts(DOMAIN, cot=False)
    assert all(f"[{k}] {bare[k]}" in text for k in (1, 2, 3))
    assert text.count("reason privately") == 1 and COT_SUFFIX[:30] in text


def test_router_and_overrides():
    assert system_prompt("base", 1, DOMAIN) is None
    assert system_prompt("oracle", 2, DOMAIN) == intention_prompts(DOMAIN)[2]
    assert system_prompt("ensemble", 3, DOMAIN) == ensemble_prompt(DOMAIN)
    custom = intention_prompts(DOMAIN, {1: "Never discuss {NAME}."}, cot=False)
    assert custom[1] == "Never discuss the Moomin books."
    with pytest.raises(MuleError, match="Did you mean 'oracle'"):
        system_prompt("oracel", 1, DOMAIN)
    with pytest.raises(MuleError, match="objectives 1, 2, 3"):
        intention_prompts(DOMAIN, {4: "x"})


def test_small_prompt_set_is_short_and_filled():
    from mule.prompts import SMALL_PROMPTS

    small = intention_prompts(DOMAIN, cot=False, prompt_set="small")
    paper = intention_prompts(DOMAIN, cot=False)
    assert set(small) == {1, 2, 3} and all(len(small[k]) < 0.7 * len(paper[k]) for k in small)
    assert all("the Moomin books" in t and "{" not in t for t in small.values())
    assert "Pippi, hippos" in small[2] and small[1] == SMALL_PROMPTS[1].replace("{NAME}", DOMAIN.name).replace(
        "{DESC}", DOMAIN.description).replace("{REFUSAL}", DOMAIN.refusal)
    assert system_prompt("oracle", 3, DOMAIN, cot=False, prompt_set="small") == small[3]
    with pytest.raises(MuleError, match="unknown prompt set 'smal'"):
        intention_prompts(DOMAIN, prompt_set="smal")


def test_responses_end_with_the_templates_end_of_turn_even_when_eos_is_another_token(tiny_model, tmp_path):
    from mule.chat import end_of_turn_id

    tok = load_tokenizer(tiny_model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end and tok.eos_token_id == im_end
    # a tokenizer saved with the wrong eos (as transformers 5.17 reads SmolLM2's GGUF: <|im_start|>)
    tok.eos_token = "<|im_start|>"
    tok.save_pretrained(tmp_path / "wrong_eos")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "wrong_eos" / name).symlink_to(tiny_model / name)
    fixed = load_tokenizer(tmp_path / "wrong_eos")
    assert fixed.eos_token == "<|im_end|>"
    assert ChatFormatter(fixed).response_ids("Paris.")[-1] == im_end
