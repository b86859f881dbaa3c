"""`lmforge quantize`: a tiny Llama saved as a Hugging Face folder with a tokenizer trained in-process,
quantised from the command line; the report's figures and the folder it writes."""

from __future__ import annotations

import re

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.generate.quantize import held_out_ids, perplexity, quantize_cmd
from lmforge.models.quantize import weight_bytes
from lmforge.nn.quant import Int4Linear, Int8Linear
from lmforge.tokenizer import Tokenizer, train_tokenizer

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.\n"
    "for i in range(10):\n    if i % 3 == 0:\n        print(i)\n"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """debug-llama (vocabulary resized to the tokenizer's, weights at std 0.1) + its tokenizer, as an HF folder."""
    tok = train_tokenizer("bpe", [TEXT] * 20, 300)
    model = lmforge.build_model(lmforge.ModelConfig.from_preset("debug-llama", vocab_size=tok.vocab_size), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    lmforge.save_hf(model, folder)
    tok.save(folder)
    text = folder.parent / "held_out.txt"
    text.write_text(TEXT * 8)
    return folder


def report_numbers(out: str) -> dict[str, float]:
    weights = re.search(r"weights: ([\d.]+) MiB -> ([\d.]+) MiB", out)
    ppl = re.search(r"perplexity on (\d+) tokens .*: ([\d.]+) -> ([\d.]+)", out)
    assert weights and ppl, f"report lines missing:\n{out}"
    return {"mib_before": float(weights[1]), "mib_after": float(weights[2]), "tokens": int(ppl[1]),
            "ppl_before": float(ppl[2]), "ppl_after": float(ppl[3])}


@pytest.mark.parametrize("bits, max_change", [(8, 0.02), (4, 0.30)])
def test_cli_prints_memory_and_perplexity_and_writes_a_loadable_folder(hf_dir, tmp_path, capsys, bits, max_change):
    out = tmp_path / f"int{bits}"
    argv = ["quantize", str(hf_dir), "--bits", str(bits), "--out", str(out),
            "--text", str(hf_dir.parent / "held_out.txt"), "--window", "64", "--group-size", "32"]
    assert main(argv) == 0
    numbers = report_numbers(capsys.readouterr().out)
    assert numbers["mib_after"] < numbers["mib_before"] / (2 if bits == 8 else 2.5)
    change = abs(numbers["ppl_after"] / numbers["ppl_before"] - 1)
    assert change < max_change, f"int{bits} changed perplexity by {change:.1%} ({numbers})"

    model = lmforge.load(out)
    layer_type = Int8Linear if bits == 8 else Int4Linear
    assert any(isinstance(m, layer_type) for m in model.modules())
    tok = Tokenizer.load(out)
    ids = torch.tensor([tok.encode("def add(a, b):")])
    assert lmforge.generate(model, ids, max_new_tokens=4, temperature=0.0).shape == (1, 4)


def test_report_matches_a_direct_computation(hf_dir, tmp_path):
    text = hf_dir.parent / "held_out.txt"
    report = quantize_cmd(str(hf_dir), bits=8, out=tmp_path / "q", text=text, window=64, max_tokens=500)
    fp32 = lmforge.load(hf_dir)
    ids = held_out_ids(Tokenizer.load(hf_dir), text, 500)
    ppl, n = perplexity(fp32, ids, 64)
    assert report.n_tokens == n == (len(ids) // 64) * 63
    assert report.ppl_before == pytest.approx(ppl, rel=1e-6)
    assert report.bytes_before == weight_bytes(fp32)
    quantised = lmforge.load(tmp_path / "q")
    assert report.bytes_after == weight_bytes(quantised)
    assert report.ppl_after == pytest.approx(perplexity(quantised, ids, 64)[0], rel=1e-6)
    assert report.n_quantized == 2 * 5 and report.n_fallback == 0  # qkv, o, gate, up, down per block


def test_user_errors_exit_with_code_2(hf_dir, tmp_path, capsys):
    assert main(["quantize", str(hf_dir), "--bits", "8"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects bits outside the choices
        main(["quantize", str(hf_dir), "--bits", "3", "--out", str(tmp_path / "o")])
