"""Recipe values are checked when the recipe is built, from YAML files, from --section.key=value overrides and from
Python: each wrong value is refused with its key (as the user writes it), the value, the expected type and an
example; the rules between fields fail before anything is written, naming both keys and a fix that works."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from lmforge.train.recipe import (
    DataSection,
    Recipe,
    TokenizerKind,
    TrainSection,
    load_recipe,
    recipe_from_dict,
    recipe_yaml,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))
DEBUG = RECIPES / "debug.yaml"


def _error(overrides: list[str], recipe: Path = DEBUG) -> str:
    with pytest.raises(ValueError) as info:
        load_recipe(recipe, overrides)
    return str(info.value)


def _fixes(message: str) -> list[str]:
    """The `--key=value` fixes an error message suggests (without the leading dashes)."""
    return [m.rstrip(").,;") for m in re.findall(r"--([\w.]+=[^\s)]+)", message)]


# (override, the message's pattern): the audit's cases first
BAD = [
    ("train.compile=maybe", r"train.compile='maybe' is not true or false \(bool\); e.g. --train.compile=false"),
    ("train.compile=yes", r"train.compile='yes' is not true or false \(bool\)"),  # YAML 1.1's yes is a string here
    ("optim.lr=abc", r"optim.lr='abc' is not a finite number \(float\); e.g. --optim.lr=0.0003"),
    ("optim.lr=.nan", r"optim.lr=nan is not a finite number \(float\)"),
    ("optim.lr=true", r"optim.lr=true is not a finite number \(float\)"),
    ("train.seed=abc", r"train.seed='abc' is not a whole number \(int\); e.g. --train.seed=0"),
    ("train.steps=1.5", r"train.steps=1.5 is not a whole number \(int\); e.g. --train.steps=100"),
    ("train.steps=true", r"train.steps=true is not a whole number \(int\)"),
    ("optim.betas=0.9", r"optim.betas=0.9 is not a list of 2 numbers; e.g. --optim.betas=\[0.9,0.95\]"),
    ("optim.betas=[0.9,0.95,0.99]", r"optim.betas=\[0.9, 0.95, 0.99\] is not a list of 2 numbers"),
    ("optim.betas=[0.9,x]", r"optim.betas=\[0.9, 'x'\] is not a list of 2 numbers"),
    ("optim.fused=maybe", r"optim.fused='maybe' is not true or false \(bool\) or null; e.g. --optim.fused=true"),
    ("data.inputs=[prose,1]", r"data.inputs=\['prose', 1\] is not a list of strings \(or one string\); "
                              r"e.g. --data.inputs=\[python-code\]"),
    ("data.tokenizer.path=3", r"data.tokenizer.path=3 is not a string \(str\) or null; e.g. --data.tokenizer.path="),
    ("data.objective=gpt", r"data.objective='gpt' is not supported; choose one of \('clm', 'mlm', 'span', "
                           r"'seq2seq'\), e.g. --data.objective=clm"),
    ("data.tokenizer.kind=sentencepiece", r"data.tokenizer.kind='sentencepiece' is not supported; choose one of "
                                          r"\('bpe', 'wordpiece', 'unigram'\)"),
    ("train.device=gpu", r"train.device='gpu' is not supported; choose one of \('auto', 'cpu', 'cuda'\)"),
    ("train.precision=fp8",
     r"train.precision='fp8' is not supported; choose one of \('fp32', 'bf16', 'fp16', 'auto'\)"),
    ("model.overrides=4", r"model.overrides=4 is not a mapping of names to values; e.g. --model.overrides.n_layer=4"),
    ("optim=3", r"optim=3 is not a section: expected a mapping of its keys \['betas', .*\], e.g. --optim.lr=0.0003"),
    ("optim.lr=-1", r"optim: optimizer lr must be > 0: got -1.0"),  # OptimConfig's own check, under its section
    ("schedule.kind=step", r"schedule: schedule kind 'step' is unknown; valid kinds: \['constant'"),
    ("train.max_bad_steps=0", r"train.max_bad_steps=0 must be at least 1"),
    ("eval.batches=0", r"eval.batches=0 must be at least 1"),
    ("data.tokenizer.max_chars=0", r"data.tokenizer.max_chars=0 must be at least 1"),
    ("data.tokenizer.sentinels=-1", r"data.tokenizer.sentinels=-1 must be >= 0"),
    ("data.val_fraction=0", r"data.val_fraction=0.0 must lie strictly between 0 and 1"),
    ("train.label_smoothing=1", r"train.label_smoothing=1.0 must lie in \[0, 1\)"),
    ("data.inputs=[]", r"data.inputs is empty; name at least one corpus, file or folder, e.g. --data.inputs="),
    ("optim.learning_rate=1", r"unknown recipe key\(s\) \['optim.learning_rate'\]; valid: \['betas'"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_a_wrong_override_names_its_key_value_type_and_an_example(override, message):
    assert re.search(message, _error([override])), _error([override])


def test_wrong_values_in_a_yaml_file_are_refused_as_overrides_are(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("extends: " + str(DEBUG) + "\ntrain: {steps: 1.0e+3, compile: maybe}\n")
    with pytest.raises(ValueError, match=r"train.compile='maybe' is not true or false \(bool\)"):
        load_recipe(path)
    path.write_text("optim:\n  betas: 0.9\n")
    with pytest.raises(ValueError, match=r"optim.betas=0.9 is not a list of 2 numbers"):
        load_recipe(path)


def test_a_recipe_built_in_python_is_checked_and_converted_too():
    with pytest.raises(ValueError, match=r"train.compile='maybe' is not true or false"):
        Recipe(train=TrainSection(compile="maybe"))
    with pytest.raises(ValueError, match=r"train.steps=1.5 is not a whole number"):
        Recipe(train=TrainSection(steps=1.5))
    recipe = Recipe(data=DataSection(inputs="prose"), train=TrainSection(steps=1e3, label_smoothing=0))
    assert recipe.data.inputs == ["prose"] and recipe.train.steps == 1000 and type(recipe.train.steps) is int
    assert type(recipe.train.label_smoothing) is float


def test_good_values_are_converted_to_their_fields_types():
    r = load_recipe(DEBUG, ["train.steps=1e3", "optim.lr=1", "optim.betas=[0.9,1e-1]", "data.inputs=prose",
                            "optim.fused=null", "train.compile=true", "data.tokenizer.max_chars=2e6",
                            "model.overrides.n_layer=4", "eval.every=100", "checkpoint.every=1e3"])
    assert (r.train.steps, r.optim.lr, r.optim.betas, r.data.inputs) == (1000, 1.0, (0.9, 0.1), ["prose"])
    assert [type(v) for v in (r.train.steps, r.optim.lr, *r.optim.betas, r.data.tokenizer.max_chars)] == \
        [int, float, float, float, int]
    assert r.optim.fused is None and r.train.compile is True and r.model.overrides == {"n_layer": 4, "d_model": 64}
    # YAML 1.1's yes / no / on / off are strings (a corpus may be called that); the checkpoint.every rule is
    # waived when a checkpoint is written only at the end, where the run always evaluates
    r = recipe_from_dict({"data": {"inputs": ["no", "on"]}, "train": {"steps": 8},
                          "eval": {"every": 1000}, "checkpoint": {"every": 8}})
    assert r.data.inputs == ["no", "on"]
    assert recipe_from_dict({"eval": None}).eval.every == 50, "an empty section (keys commented out) takes defaults"


def test_the_tokenizer_kinds_are_the_tokenizer_trainers():
    from lmforge.tokenizer.train import KINDS

    assert get_args(TokenizerKind) == KINDS


# -- rules between fields -----------------------------------------------------------------------------------------

def test_warmup_longer_than_the_run_names_both_keys_and_fixes_that_work():
    message = _error(["train.steps=3"])
    assert message.startswith("schedule.warmup_steps=5 exceeds train.steps=3"), message
    assert _fixes(message) == ["schedule.warmup_steps=0", "train.steps=5"], message
    for fix in _fixes(message):
        load_recipe(DEBUG, ["train.steps=3", fix])


@pytest.mark.parametrize("name", [n for n in ALL if "tiny" in n or n == "debug.yaml"])
def test_a_three_step_run_of_a_tiny_recipe_fails_early_with_the_fix(name):
    message = _error(["train.steps=3"], RECIPES / name)
    assert "schedule.warmup_steps=5 exceeds train.steps=3" in message, message
    load_recipe(RECIPES / name, ["train.steps=3", "schedule.warmup_steps=0"])


@pytest.mark.parametrize("every, evals, fixes", [(4, 8, ["checkpoint.every=8", "eval.every=4"]),
                                                 (7, 4, ["checkpoint.every=8", "eval.every=7"])])
def test_checkpoints_between_evaluations_are_refused_with_both_keys(every, evals, fixes):
    overrides = ["train.steps=16", f"checkpoint.every={every}", f"eval.every={evals}"]
    message = _error(overrides)
    assert message.startswith(f"checkpoint.every={every} must be a multiple of eval.every={evals}"), message
    assert _fixes(message) == fixes
    for fix in fixes:
        load_recipe(DEBUG, [*overrides, fix])
    load_recipe(DEBUG, ["train.steps=16", "checkpoint.every=16", f"eval.every={evals}"])  # only the last step's


def test_every_recipe_checkpoints_at_evaluations():
    for name in ALL:  # load_recipe enforces it; this says which recipe breaks it
        recipe = load_recipe(RECIPES / name)
        assert recipe.checkpoint.every % recipe.eval.every == 0, name


def test_global_batch_must_hold_whole_micro_batches():
    message = _error(["batch.global_batch=6"])
    assert message.startswith("batch.global_batch=6 must be a multiple of batch.micro_batch=4"), message
    assert _fixes(message) == ["batch.global_batch=8"]
    load_recipe(DEBUG, _fixes(message))


@pytest.mark.parametrize("recipe, overrides, message", [
    ("debug.yaml", ["model.preset=gpt3"], r"model.preset='gpt3' with model.overrides=.*unknown preset 'gpt3'; "
                                          r"valid presets: .*debug-llama"),
    ("debug.yaml", ["model.overrides.n_layr=2"], r"unknown ModelConfig field\(s\) \['n_layr'\]"),
    ("debug.yaml", ["data.objective=mlm"], r"data.objective=mlm trains encoder models .* debug-bert"),
    ("gpt2-tiny.yaml", ["batch.seq_len=256"], r"batch.seq_len=256 exceeds the 128 positions of the learned position "
                                              r"table of model.preset='debug-gpt2'; lower it \(--batch.seq_len=128\)"),
    ("bert-tiny.yaml", ["data.tokenizer.kind=bpe"], r"data.objective=mlm needs a mask token, .* not 'bpe'; set "
                                                    r"--data.tokenizer.kind=wordpiece"),
    ("t5-tiny.yaml", ["data.tokenizer.sentinels=0"], r"data.objective=span needs sentinel tokens .*sentinels=100"),
    ("bert-tiny.yaml", ["data.document_attention=true"], r"document_attention applies to data.objective=clm only"),
])
def test_model_objective_and_tokenizer_are_checked_before_the_run(recipe, overrides, message):
    assert re.search(message, _error(overrides, RECIPES / recipe)), _error(overrides, RECIPES / recipe)


def test_grown_position_table_and_a_given_tokenizer_pass():
    load_recipe(RECIPES / "gpt2-tiny.yaml", ["batch.seq_len=256", "model.overrides.position.max_seq_len=256"])
    load_recipe(RECIPES / "bert-tiny.yaml", ["data.tokenizer.kind=bpe", "data.tokenizer.path=some/tokenizer"])


# -- the run folder's recipe.yaml -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_the_resolved_recipe_round_trips_through_recipe_yaml(name, tmp_path):
    recipe = load_recipe(RECIPES / name)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))  # as run_info.write_run_info writes it
    assert load_recipe(path) == recipe
    path.write_text(recipe_yaml(recipe))
    assert load_recipe(path) == recipe


def test_strings_that_look_like_other_types_round_trip(tmp_path):
    inputs = ["yes", "off", "1e3", "null", "true", "0x10"]
    recipe = recipe_from_dict({"data": {"inputs": inputs}})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(recipe))
    assert load_recipe(path) == recipe and recipe.data.inputs == inputs
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))  # quotes all but 1e3, a float to YAML 1.2
    with pytest.raises(ValueError, match=r"data.inputs=\['yes', 'off', 1000.0, "):
        load_recipe(path)
