"""`lmforge generate` and `lmforge chat`: a model on disk, a prompt or a conversation in, streamed text out.

MODEL is any of: a run folder written by `lmforge train` (its latest checkpoint and the tokenizer inside),
a Hugging Face checkpoint folder with its tokenizer (`lmforge.load` + `Tokenizer.load`), or a .gguf file
(weights and tokenizer both read from it).

Chat prompts are rendered by the tokenizer's chat template (Jinja, as transformers renders it). A tokenizer
without one (or `--template plain`) gets `PLAIN_CHAT_TEMPLATE`, a plain transcript

    System: {system}
    User: {message}
    Assistant: {answer}

which any language model can continue, chat-tuned or not; the answer ends at the end-of-sequence token or
where the model starts the next "User:" line. With a template, it ends at the template's end-of-turn token
(the special token the template writes right after an assistant message, e.g. `<|im_end|>` for ChatML).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import torch
from torch import nn

from lmforge.generate.engine import context_limit, stream
from lmforge.nn.packed import pack_for_cpu
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import render_text

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOP_STRINGS = ("\nUser:",)  # the model starting the user's next turn ends its answer
_MARKER = "\ue000"  # a private-use character: never in a template's own text


def load_model_and_tokenizer(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer, str]:
    """(model in eval mode on `device`, tokenizer, kind) for a run folder ("run"), a Hugging Face folder ("hf")
    or a .gguf file ("gguf")."""
    from lmforge.models.hf import load
    from lmforge.train.export import load_run_model

    path = Path(path)
    if path.is_dir() and (path / "run.json").is_file():
        model, tokenizer, kind = load_run_model(path), Tokenizer.load(path / "tokenizer"), "run"
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer, kind = load(path), Tokenizer.load(path), "gguf"
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer, kind = load(path), Tokenizer.load(path), "hf"
    else:
        raise FileNotFoundError(f"{path} is not a model: pass a run folder written by `lmforge train` (with "
                                "run.json), a Hugging Face checkpoint folder (config.json, weights, tokenizer.json) "
                                "or a .gguf file")
    if model.config.arch not in ("decoder", "encoder_decoder"):
        raise ValueError(f"{path} holds an {model.config.arch} model, which does not generate text; use a "
                         "decoder or encoder-decoder language model")
    model = model.to(device).eval()
    # oneDNN-packed Linear weights: the same math, about twice the decode speed on CPU (nn/packed.py)
    return (pack_for_cpu(model) if torch.device(device).type == "cpu" else model), tokenizer, kind


def encode_prompt(tokenizer: Tokenizer, text: str, kind: str, arch: str = "decoder") -> list[int]:
    """The prompt's ids: the tokenizer's own special tokens (e.g. Llama's BOS, T5's and Marian's closing </s>),
    and for a run folder's model what its training data had around a text: before a decoder's prompt the
    end-of-sequence token (packed training data puts it before every document but the first, so a prompt
    starts where documents start); after an encoder-decoder's source the end-of-sequence token, as every
    source of its pair shards ends (`lmforge.data.pair_shards`)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eos_id
    if kind == "run" and eos is not None:
        if arch == "encoder_decoder":
            return ids if ids and ids[-1] == eos else [*ids, eos]
        ids = [eos, *ids]
    return ids


@dataclass
class ChatFormat:
    """How a conversation becomes a prompt and where an answer ends."""

    tokenizer: Tokenizer  # carries the template used
    plain: bool  # PLAIN_CHAT_TEMPLATE stands in for a missing (or refused) template
    stop_token_ids: list[int]
    stop_strings: list[str]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = render_text(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)


def chat_format(tokenizer: Tokenizer, template: Literal["auto", "plain"] = "auto") -> ChatFormat:
    """The tokenizer's chat template with its end-of-turn token, or the plain transcript ("plain", or "auto"
    for a tokenizer without a template)."""
    if template not in ("auto", "plain"):
        raise ValueError(f"template={template!r} is not one of 'auto', 'plain'")
    plain = template == "plain" or not tokenizer.chat_template
    if plain:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        return ChatFormat(tokenizer, True, [], list(PLAIN_STOP_STRINGS))
    return ChatFormat(tokenizer, False, end_of_turn_ids(tokenizer), [])


def end_of_turn_ids(tokenizer: Tokenizer) -> list[int]:
    """The special token the chat template writes right after an assistant message (ChatML: `<|im_end|>`,
    Llama 3: `<|eot_id|>`), found by rendering a marker as the answer; [] when the template puts none there."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
    text = render_text(tokenizer, messages)
    after = text[text.index(_MARKER) + 1:] if _MARKER in text else ""
    specials = [tokenizer.id_to_token(i) for i in sorted(tokenizer.special_ids())]
    found = [t for t in specials if t and after.lstrip(" ").startswith(t)]
    return [tokenizer.token_to_id(max(found, key=len))] if found else []


@dataclass
class Settings:
    """The decoding options shared by both commands (sampling, stops, context handling)."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    truncate: bool

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_s: float  # prefill + the first step
    reason: str  # "stop" (a stop id or string), "length" (max_new_tokens) or "context" (the context is full)
    note: str = ""  # beam search / speculative decoding figures

    def stats(self) -> str:
        if self.first_token_s >= self.seconds:  # written at once (beam search, speculative decoding)
            rate = f"{self.new_tokens / self.seconds:.1f} tok/s overall" if self.seconds > 0 else "-"
            return (f"[{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.seconds:.2f} s, {rate}"
                    f"{self.note}; stopped: {self.reason}]")
        rate = (self.new_tokens - 1) / (self.seconds - self.first_token_s) if self.new_tokens > 1 else 0.0
        return (f"[{self.prompt_tokens} prompt + {self.new_tokens} new tokens in {self.seconds:.2f} s; first token "
                f"{self.first_token_s:.2f} s, then {rate:.1f} tok/s; stopped: {self.reason}]")


def new_token_budget(cfg, prompt_len: int, max_new_tokens: int, truncate: bool) -> tuple[int, str]:
    """(max new tokens, reason): max_new_tokens and "length", or what the context still holds and "context".
    With `truncate`, a decoder keeps max_new_tokens when it fits the context at all (the prompt is cut)."""
    limit = context_limit(cfg)
    room = limit - prompt_len + 1 if cfg.arch == "decoder" else limit  # new tokens the context holds
    if 1 <= room < max_new_tokens and not (truncate and cfg.arch == "decoder" and max_new_tokens <= limit):
        return room, "context"
    return max_new_tokens, "length"


def complete(model: nn.Module, tokenizer: Tokenizer, ids: list[int], settings: Settings, out: TextIO | None,
             *, stop_token_ids: list[int] = (), stop_strings: list[str] = (), seed: int | None = None) -> Completion:
    """Decode one prompt, writing text to `out` as it comes; returns the whole text and timings.

    max_new_tokens is lowered to what the context still holds (reason "context"); a prompt that does not fit
    at all is an error unless settings.truncate (then its last tokens are kept)."""
    if not ids:
        raise ValueError("the prompt is empty (no tokens); give some text")
    max_new, reason = new_token_budget(model.config, len(ids), settings.max_new_tokens, settings.truncate)
    device = next(model.parameters()).device
    start = time.perf_counter()
    first = None
    pieces, n = [], 0
    steps = stream(model, torch.tensor([ids], device=device), max_new_tokens=max_new, tokenizer=tokenizer,
                   stop_token_ids=list(stop_token_ids), stop_strings=list(stop_strings), seed=seed,
                   truncate_prompt=settings.truncate, **settings.sampling())
    for step in steps:
        first = time.perf_counter() - start if first is None else first
        n += 1
        pieces.append(step.text[0])
        if out is not None and step.text[0]:
            out.write(step.text[0])
            out.flush()
        if bool(step.finished[0]):
            reason = "stop"
    seconds = time.perf_counter() - start
    return Completion("".join(pieces), len(ids), n, seconds, first or seconds, reason)


def complete_whole(model: nn.Module, tokenizer: Tokenizer, ids: list[int], settings: Settings, out: TextIO,
                   *, stop_token_ids: list[int], num_beams: int, length_penalty: float, draft_model: nn.Module | None,
                   prompt_lookup: int | None, draft_tokens: int) -> Completion:
    """Beam search or speculative decoding of one prompt: the text is written when decoding is done (beam
    search only knows its best hypothesis at the end); speculative decoding adds its acceptance rate."""
    from lmforge.generate.beam import beam_search
    from lmforge.generate.speculative import speculative_generate

    if not ids:
        raise ValueError("the prompt is empty (no tokens); give some text")
    cfg = model.config
    max_new, reason = new_token_budget(cfg, len(ids), settings.max_new_tokens, truncate=False)
    stops = [i for i in [cfg.eos_token_id, *stop_token_ids] if i is not None]
    prompt = torch.tensor([ids], device=next(model.parameters()).device)
    start = time.perf_counter()
    note = ""
    if num_beams != 1:
        if settings.temperature not in (0.0, 1.0) or settings.top_k or settings.top_p != 1.0 or settings.min_p:
            settings = dataclasses.replace(settings, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
            note = " (sampling options ignored: beam search is deterministic)"
        result = beam_search(model, prompt, num_beams=num_beams, max_new_tokens=max_new, length_penalty=length_penalty,
                             eos_token_id=stops)
        new = result.sequences[0, : int(result.lengths[0])].tolist()
        note = f"; {num_beams} beams, score {float(result.scores[0]):.3f}" + note
    else:
        new_ids, spec = speculative_generate(
            model, prompt, max_new_tokens=max_new, draft_model=draft_model, prompt_lookup=prompt_lookup,
            num_draft_tokens=draft_tokens, eos_token_id=stops, seed=settings.seed, **settings.sampling())
        new = new_ids[0].tolist()
        note = (f"; speculative: {spec.accepted}/{spec.drafted} drafted tokens accepted "
                f"({spec.acceptance_rate:.0%}), {spec.tokens_per_target_call:.2f} tokens per target call")
    seconds = time.perf_counter() - start
    if new and new[-1] in stops:
        new, reason = new[:-1], "stop"
    text = tokenizer.decode(new, skip_special_tokens=True)
    out.write(text)
    out.flush()
    return Completion(text, len(ids), len(new) + (reason == "stop"), seconds, seconds, reason, note)


def generate_cmd(model: str, prompt: str | None = None, max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 0.95, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
                 system: str | None = None, template: Literal["auto", "plain"] = "auto", truncate: bool = False,
                 stats: bool = True, device: str = "cpu", num_beams: int = 1, length_penalty: float = 1.0,
                 draft: str | None = None, prompt_lookup: int | None = None, draft_tokens: int = 4) -> None:
    """Continue a prompt with a model and stream the text to stdout.

    MODEL is a run folder from `lmforge train`, a Hugging Face checkpoint folder (with its tokenizer) or a
    .gguf file. A prompt longer than the model's context (position.max_seq_len) is an error unless --truncate;
    generation stops at the end-of-sequence token, a --stop string, --max-new-tokens or the context's end.

    Args:
        model: run folder, Hugging Face folder or .gguf file.
        prompt: the text to continue (unset: read standard input).
        max_new_tokens: the most tokens to generate.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample among the k most likely tokens (0: off).
        top_p: nucleus sampling: the smallest set of tokens with this much probability, in (0, 1] (1: off).
        min_p: drop tokens less likely than min_p times the most likely one (0: off).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1: off).
        seed: seed for sampling (unset: random).
        stop: strings that end the output (not printed); one or more.
        chat: wrap the prompt in the chat template as a user message, and stop at the end of the answer.
        system: with --chat, a system message first.
        template: with --chat: auto (the tokenizer's chat template, else the plain User/Assistant transcript)
            or plain (always the transcript).
        truncate: keep the last tokens of a prompt too long for the context instead of failing.
        stats: print prompt and generated token counts, time to first token and tokens/s to stderr.
        device: where to run the model (cpu, cuda, ...).
        num_beams: > 1: beam search with this many beams (deterministic; prints the best hypothesis when done).
        length_penalty: beam search: scores are log-probability sums / length ** length_penalty.
        draft: speculative decoding with this draft model (run folder, HF folder or .gguf; same tokenizer).
        prompt_lookup: speculative decoding drafting by n-gram prompt lookup, matching n-grams up to this size.
        draft_tokens: speculative decoding: tokens proposed per verification step.
    """
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("--prompt TEXT is required (or pipe the prompt into standard input)")
        prompt = sys.stdin.read()
    if not prompt:
        raise ValueError("--prompt is empty (''); give some text to continue")
    if system is not None and not chat:
        raise ValueError("--system needs --chat (a system message belongs to a chat template)")
    settings = Settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, truncate)
    net, tokenizer, kind = load_model_and_tokenizer(model, device)
    stop_ids, stop_strings = [], list(stop or [])
    if chat:
        fmt = chat_format(tokenizer, template)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = fmt.prompt_ids(messages)
        stop_ids, stop_strings = fmt.stop_token_ids, fmt.stop_strings + stop_strings
    else:
        ids = encode_prompt(tokenizer, prompt, kind, net.config.arch)
    if num_beams != 1 or draft is not None or prompt_lookup is not None:
        if stop_strings:
            raise ValueError(f"stop strings {stop_strings!r} work with plain decoding only, not with --num-beams / "
                             "--draft / --prompt-lookup; drop --stop (or use --template auto with --chat)")
        draft_model = load_model_and_tokenizer(draft, device)[0] if draft is not None else None
        result = complete_whole(net, tokenizer, ids, settings, sys.stdout, stop_token_ids=stop_ids,
                                num_beams=num_beams, length_penalty=length_penalty, draft_model=draft_model,
                                prompt_lookup=prompt_lookup, draft_tokens=draft_tokens)
    else:
        result = complete(net, tokenizer, ids, settings, sys.stdout, stop_token_ids=stop_ids,
                          stop_strings=stop_strings, seed=seed)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        print(result.stats(), file=sys.stderr)


def chat_cmd(model: str, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.7,
             top_k: int = 0, top_p: float = 0.9, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: int | None = None, template: Literal["auto", "plain"] = "auto", truncate: bool = False,
             stats: bool = False, device: str = "cpu") -> None:
    """Talk with a model: a multi-turn conversation on standard input, answers streamed to stdout.

    Each line read is a user message; the whole conversation so far is rendered by the tokenizer's chat
    template (a tokenizer without one gets a plain "User: ... / Assistant: ..." transcript, announced on
    stderr) and the answer is streamed until the template's end-of-turn token. Commands: /reset forgets the
    conversation (the system message stays), /exit ends (so does the end of input). Works with piped input.

    Args:
        model: run folder from `lmforge train`, Hugging Face folder or .gguf file.
        system: a system message that starts the conversation.
        max_new_tokens: the most tokens per answer (fewer when the context fills up).
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample among the k most likely tokens (0: off).
        top_p: nucleus sampling: the smallest set of tokens with this much probability, in (0, 1] (1: off).
        min_p: drop tokens less likely than min_p times the most likely one (0: off).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1: off).
        seed: seed for sampling; turn i uses seed + i (unset: random).
        template: auto (the tokenizer's chat template, else the plain transcript) or plain (always the transcript).
        truncate: when the conversation outgrows the context, drop its oldest turns instead of refusing.
        stats: print token counts and tokens/s to stderr after each answer.
        device: where to run the model (cpu, cuda, ...).
    """
    settings = Settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, False)
    net, tokenizer, _ = load_model_and_tokenizer(model, device)
    fmt = chat_format(tokenizer, template)
    if fmt.plain:
        reason = "--template plain" if template == "plain" else "this tokenizer has no chat template"
        print(f"({reason}: using the plain 'User: / Assistant:' transcript)", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    turn = 0
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        message = line.rstrip("\r\n")
        if message.strip() == "/exit":
            break
        if message.strip() == "/reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        conversation = [*history, {"role": "user", "content": message}]
        try:
            ids = _fit(fmt, conversation, len(start), context_limit(net.config), max_new_tokens, truncate)
            result = complete(net, tokenizer, ids, settings, sys.stdout, stop_token_ids=fmt.stop_token_ids,
                              stop_strings=fmt.stop_strings, seed=None if seed is None else seed + turn)
        except ValueError as err:  # this turn cannot be answered; the conversation goes on without it
            print(f"error: {err}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats:
            print(result.stats(), file=sys.stderr)
        answer = result.text.strip() if fmt.plain else result.text
        history = [*conversation, {"role": "assistant", "content": answer}]
        turn += 1


def _fit(fmt: ChatFormat, conversation: list[dict], keep: int, limit: int, max_new_tokens: int,
         truncate: bool) -> list[int]:
    """The conversation's prompt ids; with `truncate`, drop the oldest exchanges after the first `keep` messages
    (the system message) until the prompt leaves room for max_new_tokens, or only the last message is left."""
    ids = fmt.prompt_ids(conversation)
    while truncate and len(ids) + max_new_tokens - 1 > limit and len(conversation) > keep + 1:
        conversation = conversation[:keep] + conversation[keep + 2:]  # a user message and its answer
        ids = fmt.prompt_ids(conversation)
    if len(ids) > limit:
        hint = "/reset the conversation" + ("" if truncate else " or start the chat with --truncate")
        raise ValueError(f"the conversation is {len(ids)} tokens long but the model's context holds {limit} "
                         f"(position.max_seq_len); {hint}")
    return ids
