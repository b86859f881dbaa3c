"""Every recipe in recipes/ parses and resolves its model without building it; `extends` merges as
documented; each tiny CPU variant trains a few steps through the real loop with finite, falling loss
and its objective's eval metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmforge.config import ModelConfig
from lmforge.data.corpora import load_manifest
from lmforge.train.objectives import get_objective
from lmforge.train.recipe import load_recipe, read_recipe_file
from lmforge.train.schedule import lr_factor

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))
# big recipe -> its tiny CPU variant (debug.yaml is the tiny Llama, and the acceptance recipe)
TINY = {"gpt2.yaml": "gpt2-tiny.yaml", "llama.yaml": "debug.yaml", "bert.yaml": "bert-tiny.yaml",
        "t5.yaml": "t5-tiny.yaml", "transformer-translation.yaml": "transformer-tiny.yaml"}


def test_the_issue_recipes_exist():
    assert set(TINY) | set(TINY.values()) <= set(ALL), sorted(set(TINY) | set(TINY.values()) - set(ALL))


@pytest.mark.parametrize("name", ALL)
def test_recipe_parses_and_resolves_its_model(name):
    recipe = load_recipe(RECIPES / name)
    data, b = recipe.data, recipe.batch
    objective = get_objective(data.objective)
    # the config the loop builds, with the vocabulary the tokenizer section asks for (no model is built)
    cfg = ModelConfig.from_preset(recipe.model.preset, **{**recipe.model.overrides,
                                                           "vocab_size": data.tokenizer.vocab_size})
    objective.check(cfg, data)
    assert b.seq_len <= cfg.position.max_seq_len, f"{name}: seq_len {b.seq_len} > {cfg.position.max_seq_len} positions"
    assert b.global_batch % b.micro_batch == 0
    lr_factor(recipe.schedule, 0, recipe.train.steps)  # warmup fits the run
    if data.objective == "mlm":
        assert data.tokenizer.kind == "wordpiece", f"{name}: mlm needs [MASK]"
    if data.objective == "span":
        assert data.tokenizer.sentinels > 0, f"{name}: span corruption needs sentinels"


@pytest.mark.parametrize("big, tiny", [(b, t) for b, t in TINY.items() if t != "debug.yaml"])
def test_tiny_variants_extend_their_recipe(big, tiny):
    parent, child = load_recipe(RECIPES / big), load_recipe(RECIPES / tiny)
    assert child.data.objective == parent.data.objective and child.data.tokenizer.kind == parent.data.tokenizer.kind
    assert child.schedule.kind == parent.schedule.kind and child.optim.betas == parent.optim.betas
    assert child.model.preset.startswith("debug-") and child.train.precision == "fp32"


def test_extends_merges_sections_replaces_lists_and_refuses_cycles(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {inputs: [a, b], tokenizer: {kind: unigram, sentinels: 100}}\n"
                                        "optim: {lr: 1.0e-3, betas: [0.9, 0.99]}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\ndata: {inputs: [c], "
                                                 "tokenizer: {vocab_size: 512}}\noptim: {lr: 2.0e-3}\n")
    recipe = load_recipe(tmp_path / "sub" / "child.yaml", ["optim.eps=1e-6"])
    assert recipe.data.inputs == ["c"], "lists are replaced, not appended"
    assert (recipe.data.tokenizer.kind, recipe.data.tokenizer.sentinels, recipe.data.tokenizer.vocab_size) == \
        ("unigram", 100, 512)
    assert (recipe.optim.lr, recipe.optim.betas, recipe.optim.eps) == (2e-3, (0.9, 0.99), 1e-6)
    assert "extends" not in read_recipe_file(tmp_path / "sub" / "child.yaml")

    (tmp_path / "loop_a.yaml").write_text("extends: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("extends: loop_a.yaml\n")
    with pytest.raises(ValueError, match="extends itself"):
        load_recipe(tmp_path / "loop_a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"missing.yaml \(extended by"):
        load_recipe(tmp_path / "orphan.yaml")


# -- tiny variants through the real loop ------------------------------------------------------------------------

STEPS = 8
SHORT = [f"train.steps={STEPS}", "eval.every=4", "eval.batches=2", f"checkpoint.every={STEPS}"]


def _pairs_file(tmp_path: Path) -> str:
    """A local stand-in for translation-de when that corpus has not been fetched (it needs apt)."""
    words = ["file", "open", "save", "the", "package", "server", "user", "new", "error", "list"]
    german = ["Datei", "öffnen", "speichern", "das", "Paket", "Server", "Benutzer", "neu", "Fehler", "Liste"]
    lines = []
    for i in range(600):
        idx = [(i * 7 + k * 3) % 10 for k in range(3 + i % 5)]
        lines.append(json.dumps({"source": " ".join(words[j] for j in idx),
                                 "target": " ".join(german[j] for j in idx)}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _train_tiny(name: str, tmp_path: Path) -> list[dict]:
    from lmforge.train.loop import train

    recipe = load_recipe(RECIPES / name, SHORT)
    overrides = list(SHORT)
    if "translation-de" in recipe.data.inputs and load_manifest("translation-de") is None:
        overrides.append(f"data.inputs=[{_pairs_file(tmp_path)}]")
    train(load_recipe(RECIPES / name, overrides), tmp_path / "run", log=lambda *a, **k: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], f"{name}: losses {losses}"
    for row in rows[3], rows[7]:
        assert math.isfinite(row["val_loss"]) and row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
        assert ("val_bpb" in row) == (recipe.data.objective == "clm"), "bits per byte for clm only"
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1
    return rows


@pytest.mark.parametrize("name", ["gpt2-tiny.yaml", "debug.yaml", "bert-tiny.yaml"])
def test_tiny_variant_trains(name, tmp_path):
    _train_tiny(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5-tiny.yaml", "transformer-tiny.yaml"])
def test_tiny_encoder_decoder_variant_trains(name, tmp_path):
    _train_tiny(name, tmp_path)
