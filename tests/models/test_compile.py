"""torch.compile sees each model as one graph: a graph break splits the compiled program and costs speed
(`train.compile: true`). Dropless MoE is the exception: how many tokens each expert gets is data, so its
routing breaks the graph by design."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.presets import names

DENSE = [n for n in names() if n.startswith("debug-") and n != "debug-mixtral"]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])  # bf16: MatmulAttention path
@pytest.mark.parametrize("preset", DENSE)
def test_training_forward_is_one_graph(preset, autocast):
    cfg = lmforge.ModelConfig.from_preset(preset)
    model = lmforge.build_model(cfg, seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    args = (ids, ids) if cfg.arch == "encoder_decoder" else (ids,)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explained = torch._dynamo.explain(model)(*args)
    reasons = [b.reason.splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{preset}: graph breaks under torch.compile: {reasons}"
