"""Chat templates: ids equal transformers' apply_chat_template, the loss mask covers the assistant."""

from __future__ import annotations

import pytest

from lmforge.tokenizer import Tokenizer, render_chat, train_tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE, render_text

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 12 * 12?"},
        {"role": "assistant", "content": "\n\n144, since 12 squared is 144."},  # starts with whitespace
        {"role": "user", "content": "And in code?"},
        {"role": "assistant", "content": "print(12 ** 2)  # 😀 <|im_end|> inside"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": " a"}],
]
# The same ChatML with transformers' {% generation %} tags, so its assistant mask can be compared with ours.
TRACKED = CHATML_TEMPLATE.replace(
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\\n' }}",
)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_ids_equal_apply_chat_template(kind, generation_prompt, trained, hf_tokenizers):
    for messages in CONVERSATIONS:
        ids, mask = render_chat(trained[kind], messages, add_generation_prompt=generation_prompt)
        expected = hf_tokenizers[kind].apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False)
        assert ids == expected, (kind, messages)
        assert len(mask) == len(ids)
        if generation_prompt:  # the prompt is appended, unmasked
            plain, plain_mask = render_chat(trained[kind], messages)
            assert ids[: len(plain)] == plain and mask == plain_mask + [0] * (len(ids) - len(plain))
            assert trained[kind].token_to_id("<|im_start|>") in ids[len(plain):]


def test_mask_covers_assistant_content_and_end_of_turn(trained):
    tok = trained["bpe"]
    end = tok.token_to_id("<|im_end|>")
    for messages in CONVERSATIONS:
        ids, mask = render_chat(tok, messages)
        masked = tok.decode([i for i, m in zip(ids, mask) if m])
        assert masked == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        n_ends = sum(m["content"].count("<|im_end|>") + 1 for m in messages if m["role"] == "assistant")
        assert sum(m for i, m in zip(ids, mask) if i == end) == n_ends  # the closing markers, no others
        assert mask[0] == 0


def _assert_mask_equals_transformers_generation_mask(ours: Tokenizer, hf, conversations) -> None:
    tracked = Tokenizer(ours.engine, specials=ours.specials, chat_template=TRACKED)
    for messages in conversations:
        ids, mask = render_chat(tracked, messages)
        out = hf.apply_chat_template(messages, chat_template=TRACKED, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert ids == out["input_ids"]
        assert mask == out["assistant_masks"]
        assert render_text(tracked, messages) == render_text(ours, messages)


def test_mask_equals_transformers_generation_mask(trained, hf_tokenizers):
    """With {% generation %} tags (rendered unchanged by us), transformers computes an assistant mask too."""
    _assert_mask_equals_transformers_generation_mask(trained["bpe"], hf_tokenizers["bpe"], CONVERSATIONS)


def test_token_straddling_header_and_content_counts_as_assistant(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer("bpe", ["one\n\ntwo\n\n\nthree"] * 20, 300)
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "\ntwo"}]
    ids, mask = render_chat(tok, messages)
    newlines = tok.token_to_id("\u010a\u010a")  # "\n\n": the header's newline + the content's
    assert newlines in ids and mask[ids.index(newlines)] == 1
    hf = transformers.AutoTokenizer.from_pretrained(tok.save(tmp_path))
    _assert_mask_equals_transformers_generation_mask(tok, hf, [messages])


def test_bpe_merges_never_cross_special_tokens(trained):
    """Tokenizing the text between special tokens piece by piece gives the ids of the whole text."""
    tok = trained["bpe"]
    for messages in CONVERSATIONS:
        text = render_text(tok, messages)
        pieces = text.replace("<|im_start|>", "\0<|im_start|>\0").replace("<|im_end|>", "\0<|im_end|>\0").split("\0")
        assert sum((tok.encode(p) for p in pieces if p), []) == tok.encode(text)


def test_foreign_template_with_default_system_prompt(trained):
    """A template that adds text of its own (SmolLM2's default system prompt) still gets the right mask."""
    template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe kind.<|im_end|>\\n' }}"
                "{% endif %}" + CHATML_TEMPLATE)
    base = trained["bpe"]
    tok = Tokenizer(base.engine, specials=base.specials, chat_template=template)
    ids, mask = render_chat(tok, CONVERSATIONS[0])
    assert tok.decode(ids).startswith("<|im_start|>system\nBe kind.")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello, how can I help?<|im_end|>"


def test_errors_name_the_fix(trained, corpus):
    base = trained["bpe"]
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(Tokenizer(base.engine, specials=base.specials), CONVERSATIONS[0])
    trimming = Tokenizer(base.engine, specials=base.specials,
                         chat_template=CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim"))
    with pytest.raises(ValueError, match="changes message contents"):
        render_chat(trimming, [{"role": "assistant", "content": " padded "}])
    with pytest.raises(ValueError, match="message 1 must be a dict"):
        render_chat(base, [{"role": "user", "content": "x"}, {"role": "assistant"}])
