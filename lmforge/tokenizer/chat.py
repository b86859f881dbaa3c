"""Chat templates: a conversation -> token ids plus a loss mask that marks what the assistant says.

The template is a Jinja string stored as "chat_template" in tokenizer_config.json, as Hugging Face
does, and is rendered the way `transformers` renders it (sandboxed, trim_blocks, lstrip_blocks,
`raise_exception`, `tojson`, the special tokens as variables), so `render_chat` gives exactly the ids
of `AutoTokenizer.from_pretrained(folder).apply_chat_template(messages)`.

The mask is found without trusting the template's layout: the conversation is rendered a second
time with each message's content replaced by a unique marker, which locates every content span in
the rendered text. The whole text is then tokenized ONCE (so the ids cannot differ from tokenizing
it in one go) and a token is masked in when its characters overlap an assistant span: the content
plus the end-of-turn token right after it. A token straddling the border between the role header
and the content (possible when the content starts with whitespace) counts as assistant.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

from lmforge.tokenizer.tokenizer import Tokenizer

CHAT_ROLE_TOKENS = ("<|im_start|>", "<|im_end|>")

# ChatML (OpenAI; used by Qwen and SmolLM): <|im_start|>{role}\n{content}<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_MARKER = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in a template's own text


def render_text(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation rendered by the tokenizer's chat template, as a string."""
    if tokenizer.chat_template is None:
        raise ValueError("this tokenizer has no chat template; train it with chat_roles=True or set "
                         "tokenizer.chat_template to a Jinja template (e.g. lmforge.tokenizer.chat.CHATML_TEMPLATE)")
    _check(messages)
    variables = {f"{role}_token": token for role, token in tokenizer.specials.items()}
    return _compile(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **variables)


def render_chat(tokenizer: Tokenizer, messages: list[dict],
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, loss_mask): mask 1 on the assistant's content tokens and the end-of-turn token closing them."""
    text = render_text(tokenizer, messages, add_generation_prompt)
    marked = [dict(m, content=f"\ue000{i}\ue001") for i, m in enumerate(messages)]
    layout = render_text(tokenizer, marked, add_generation_prompt)
    end_of_turn = CHAT_ROLE_TOKENS[1] if tokenizer.token_to_id(CHAT_ROLE_TOKENS[1]) is not None \
        else tokenizer.specials.get("eos")

    spans, pieces, shift, last = [], [], 0, 0
    for match in _MARKER.finditer(layout):
        message = messages[int(match.group(1))]
        start = match.start() + shift
        end = start + len(message["content"])
        pieces += [layout[last:match.start()], message["content"]]
        shift += len(message["content"]) - len(match.group())
        last = match.end()
        if message["role"] == "assistant":
            if end_of_turn and text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            spans.append((start, end))
    if "".join(pieces) + layout[last:] != text:
        raise ValueError("the chat template changes message contents (e.g. trims them) or depends on them, "
                         "so the loss mask cannot be aligned; use a template that inserts content verbatim")

    encoding = tokenizer.engine.encode(text, add_special_tokens=False)
    mask = [int(any(_overlaps(s, e, a, b) for a, b in spans)) for s, e in encoding.offsets]
    return encoding.ids, mask


def _overlaps(s: int, e: int, a: int, b: int) -> bool:
    return a <= s < b if s == e else s < b and e > a


def _check(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {m!r}")


@lru_cache(maxsize=16)
def _compile(template: str):
    """Compile like transformers' `_compile_jinja_template`: sandboxed, same options, filters and globals."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tags) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
