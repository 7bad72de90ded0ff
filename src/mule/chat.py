"""Chat formatting that keeps the system part, the query part and the response part as separate token lists.

The rendered chat is split into:
    prefix: everything before the user's text (the system message, or the template's default one);
    body:   the user's text, the assistant header and any prefill (Obj3 attacker text);
    response: the answer tokens + the end-of-turn token.
Each part is tokenised alone and the ids are concatenated, so the body and response ids are identical for
student and teacher (METHOD_SPEC 3.2), and the prefix of a given system prompt is the same for every example,
which lets the frozen teacher compute its keys/values once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATE_STRING = "26 Jul 2024"  # pinned for every template that prints a date (Llama 3.x), METHOD_SPEC 2.1
_SENTINEL = "\u2063MULEQUERY\u2063"


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), or None.

    Read from the template, not from `eos_token`: a tokenizer's eos can be another token (transformers 5.17 reads
    SmolLM2's GGUF eos as `<|im_start|>`), and a model trained to end its turns with the wrong token never stops.
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, date_string=DATE_STRING)
    except Exception:
        return None
    tail = text.partition(_SENTINEL)[2]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


@dataclass(frozen=True)
class Encoded:
    prefix: list[int]
    body: list[int]
    response: list[int]

    @property
    def prompt(self) -> list[int]:
        return self.prefix + self.body


@dataclass
class ChatFormatter:
    """Render and tokenise (system, question, prefill, response) with a tokenizer's chat template."""

    tokenizer: object
    date_string: str = DATE_STRING
    _split_cache: dict = field(default_factory=dict, repr=False)
    _prefix_ids: dict = field(default_factory=dict, repr=False)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def _render(self, system: str | None) -> str:
        messages = [{"role": "user", "content": _SENTINEL}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        kwargs = {"tokenize": False, "add_generation_prompt": True, "date_string": self.date_string}
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except Exception:  # templates without a system role (e.g. Gemma): put it in the user turn
            if system is None:
                raise
            messages = [{"role": "user", "content": system + "\n\n" + _SENTINEL}]
            return self.tokenizer.apply_chat_template(messages, **kwargs)

    def split(self, system: str | None) -> tuple[str, str]:
        """(text before the user's query, text after it up to the assistant turn) for this system prompt."""
        if system not in self._split_cache:
            text = self._render(system)
            head, _, tail = text.partition(_SENTINEL)
            self._split_cache[system] = (head, tail)
        return self._split_cache[system]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def prefix_ids(self, system: str | None) -> list[int]:
        if system not in self._prefix_ids:
            self._prefix_ids[system] = self._ids(self.split(system)[0])
        return self._prefix_ids[system]

    def body_ids(self, question: str, prefill: str | None = None) -> list[int]:
        """Query + assistant header + prefill; the same for every system prompt (the header is the
        template's, taken from the render without a system message)."""
        return self._ids(question + self.split(None)[1] + (prefill or ""))

    def response_ids(self, response: str, prefill: str | None = None, eos: bool = True) -> list[int]:
        """Answer ids (+ end of turn). After a prefill that ends without a space, the answer gets one."""
        if prefill and not prefill[-1].isspace() and response and not response[0].isspace():
            response = " " + response
        return self._ids(response) + ([self.eos_id] if eos else [])

    def encode(self, system: str | None, question: str, prefill: str | None = None,
               response: str | None = None) -> Encoded:
        resp = self.response_ids(response, prefill) if response is not None else []
        return Encoded(self.prefix_ids(system), self.body_ids(question, prefill), resp)

    def prompt_text(self, system: str | None, question: str, prefill: str | None = None) -> str:
        return self.split(system)[0] + question + self.split(None)[1] + (prefill or "")
