"""ModelConfig: presets, overrides, derived fields and the errors users see."""

from __future__ import annotations

import pytest

from lmforge import ModelConfig
from lmforge.presets import names


def test_every_preset_builds_a_valid_config():
    for name in names():
        cfg = ModelConfig.from_preset(name)
        a = cfg.attention
        assert a.head_dim and a.n_kv_head and a.n_head % a.n_kv_head == 0, name
        assert cfg.mlp.d_ff and cfg.padded_vocab_size >= cfg.vocab_size, name


def test_required_presets_exist():
    required = {"gpt2", "gpt2-medium", "llama-3.2-1b", "mistral-7b", "mixtral-8x7b", "qwen2-0.5b", "smollm2-135m",
                "debug-gpt2", "debug-llama", "debug-mistral", "debug-mixtral", "debug-qwen2"}
    assert required <= set(names())


def test_published_shapes():
    gpt2 = ModelConfig.from_preset("gpt2")
    assert (gpt2.n_layer, gpt2.d_model, gpt2.attention.n_head, gpt2.vocab_size) == (12, 768, 12, 50257)
    llama = ModelConfig.from_preset("llama-3.2-1b")
    assert llama.attention.n_kv_head == 8 and llama.position.rope_scaling == "llama3"
    assert ModelConfig.from_preset("mistral-7b").attention.sliding_window == 4096
    assert ModelConfig.from_preset("mixtral-8x7b").moe.n_experts == 8
    assert ModelConfig.from_preset("qwen2-0.5b").attention.qkv_bias


def test_overrides_top_level_nested_and_dotted():
    cfg = ModelConfig.from_preset("debug-llama", n_layer=3, attention={"n_kv_head": 1},
                                  **{"position.rope_theta": 1234.0})
    assert cfg.n_layer == 3 and cfg.attention.n_kv_head == 1 and cfg.position.rope_theta == 1234.0
    assert cfg.attention.n_head == 4, "a nested override must merge, not replace the sub-config"


def test_derived_fields():
    cfg = ModelConfig(d_model=96, attention={"n_head": 6}, mlp={"d_ff": None}, vocab_size=1000, pad_vocab_multiple=64)
    assert cfg.attention.head_dim == 16 and cfg.attention.n_kv_head == 6
    assert cfg.mlp.d_ff == 384 and cfg.padded_vocab_size == 1024


def test_dict_round_trip():
    cfg = ModelConfig.from_preset("debug-mixtral")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=65), "d_model=65 is not divisible by attention.n_head=4"),
        (dict(attention={"n_kv_head": 3}), "n_head=4 must be a multiple of attention.n_kv_head=3"),
        (dict(norm={"kind": "batch"}), r"norm.kind='batch' is not supported; choose one of \['layer', 'rms'\]"),
        (dict(position={"kind": "rotary"}), "position.kind='rotary' is not supported"),
        (dict(moe={"n_experts": 4, "top_k": 5}), r"moe.top_k=5 must lie in \[1, moe.n_experts=4\]"),
        (dict(n_layer=0), "n_layer=0 must be a positive number"),
        (dict(attention={"head_dim": 15}), "head_dim=15 must be even"),
        (dict(n_layers=2), r"unknown ModelConfig field\(s\) \['n_layers'\]; valid fields"),
        (dict(attention={"heads": 2}), r"unknown attention field\(s\) \['heads'\]"),
    ],
)
def test_bad_values_name_the_value_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_preset("debug-llama", **overrides)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown preset 'llama-9000'; valid presets: .*debug-llama"):
        ModelConfig.from_preset("llama-9000")
