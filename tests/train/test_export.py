"""`lmforge export`: the translation recipes export as Marian (transformers' MarianMTModel and AutoTokenizer load
the folder and give our logits), and an export never mixes into a folder that already holds files unless asked."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.batchers import Seq2SeqPairs
from lmforge.data.corpora import load_manifest
from lmforge.models.hf import ADAPTERS, infer_model_type
from lmforge.tokenizer import Tokenizer
from lmforge.train.export import HF_FILES, export_hf, load_run_model
from lmforge.train.recipe import load_recipe
from tests.train.test_recipes import RECIPES, _pairs_file

TOL = 1e-4
SHORT = ["train.steps=4", "schedule.warmup_steps=2", "eval.every=4", "eval.batches=1", "checkpoint.every=4"]
PAIRS = [("Open the file with the new server.", "Datei mit dem neuen Server öffnen."),
         ("Save the list", "Liste speichern")]  # different lengths: the batch carries padding on both sides


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """transformer-tiny.yaml trained for 4 steps (translation-de, or a local pair file where it is not fetched)."""
    from lmforge.train.loop import train

    tmp = tmp_path_factory.mktemp("transformer-tiny")
    overrides = list(SHORT)
    if load_manifest("translation-de") is None:
        overrides.append(f"data.inputs=[{_pairs_file(tmp)}]")
    train(load_recipe(RECIPES / "transformer-tiny.yaml", overrides), tmp / "run", log=lambda *a, **k: None)
    return tmp / "run"


@pytest.mark.parametrize("name", ["transformer-translation.yaml", "transformer-tiny.yaml"])
def test_translation_recipes_resolve_to_a_marian_config(name):
    model = load_recipe(RECIPES / name).model
    cfg = ModelConfig.from_preset(model.preset, **model.overrides)
    assert infer_model_type(cfg) == "marian"
    hf = ADAPTERS["marian"].config_to_hf(cfg)  # raises with the reason when Marian cannot express the config
    assert hf["scale_embedding"] and hf["share_encoder_decoder_embeddings"]


def test_transformer_tiny_exports_as_marian_with_equal_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.cli import main

    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "marian"
    hf = transformers.MarianMTModel.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = Tokenizer.load(run / "tokenizer")
    for text in (t for pair in PAIRS for t in pair):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours_tok.encode(text), text
        # tokenizer(text) ends the text with EOS, as the run's training sources ended
        assert hf_tok(text)["input_ids"] == [*ours_tok.encode(text), ours_tok.eos_id], text
    assert hf.config.decoder_start_token_id == hf.config.pad_token_id == ours_tok.pad_id, "training starts at pad"
    # the batch as training builds it: EOS appended, decoder inputs shifted right after the pad id
    pairs = [(hf_tok(s, add_special_tokens=False)["input_ids"], hf_tok(t, add_special_tokens=False)["input_ids"])
             for s, t in PAIRS]
    batch = Seq2SeqPairs(pad_id=ours_tok.pad_id, decoder_start_id=ours_tok.pad_id, eos_id=ours_tok.eos_id)(pairs)
    assert not batch["attention_mask"].all() and not batch["decoder_attention_mask"].all()
    masks = dict(attention_mask=batch["attention_mask"], decoder_attention_mask=batch["decoder_attention_mask"])
    with torch.no_grad():
        ours = load_run_model(run)(batch["input_ids"], batch["decoder_input_ids"], **masks).logits
        theirs = hf(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"], **masks).logits
    real = batch["decoder_attention_mask"].bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    print(f"transformer-tiny, ours vs MarianMTModel: max |diff| = {diff:.2e}")
    assert diff <= TOL, f"MarianMTModel's logits differ from the run's by {diff:.2e} > {TOL}"


def test_export_refuses_a_nonempty_folder_and_leaves_it_alone(run, tmp_path):
    from lmforge.cli import main

    out = tmp_path / "used"
    out.mkdir()
    for name in ("thesis.tex", "a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
        (out / name).write_text("precious")
    with pytest.raises(ValueError, match=r"used is not empty \(a\.txt, b\.txt, c\.txt, d\.txt, e\.txt, \.\.\. "
                                         r"\(6 entries\)\).*or --overwrite"):
        export_hf(run, out)
    assert main(["export", str(run), "--hf", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "thesis.tex"]
    assert main(["export", str(run), "--hf", str(out / "thesis.tex")]) == 2, "a file is not a folder"
    assert not list(tmp_path.glob(".*export*")), "no staging folder left behind"
    assert main(["export", str(run), "--hf", str(out), "--overwrite"]) == 0, "--overwrite exports into it"
    assert (out / "config.json").is_file() and (out / "thesis.tex").read_text() == "precious", "other files kept"


def test_export_into_an_empty_or_new_folder(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "new" / "nested"):
        assert export_hf(run, out) == out
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not list(tmp_path.glob(".*export*"))
    # --overwrite replaces exactly these, so each file an export writes must be one of them
    assert all(any(fnmatch(name, pattern) for pattern in HF_FILES) for name in names), names


def test_overwrite_replaces_a_previous_checkpoint_and_keeps_other_files(run, tmp_path):
    import lmforge

    out = tmp_path / "hf"
    out.mkdir()
    # a stale two-shard checkpoint: its index would take precedence over the new model.safetensors
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "generation_config.json",
                 "added_tokens.json"):
        (out / name).write_text("stale")
    (out / "README.md").write_text("model card")
    assert all(any(out.glob(p)) for p in ("model*.safetensors", "generation_config.json", "added_tokens.json"))
    export_hf(run, out, overwrite=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"}, names
    assert (out / "README.md").read_text() == "model card"
    ours, again = load_run_model(run), lmforge.load(out)
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after exporting over a previous checkpoint"


def test_a_failed_export_leaves_the_folder_as_it_was(run, tmp_path, monkeypatch):
    import lmforge.train.export as export

    out = tmp_path / "hf"
    export_hf(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def refuse(model, folder):
        (Path(folder) / "config.json").write_text("{}")  # a partial write, then the converter's refusal
        raise ValueError("this config cannot be written as Hugging Face 'marian'")

    monkeypatch.setattr(export, "save_hf", refuse)
    with pytest.raises(ValueError, match="cannot be written"):
        export_hf(run, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".*export*"))
