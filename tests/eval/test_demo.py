"""The main job end to end on a short budget: it trains, beats the unigram baseline and reports."""

from __future__ import annotations

import pytest

from lmforge.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_the_unigram_baseline(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "60", "--corpus", "python-code"]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "unigram-frequency baseline" in report and "![loss curve](loss.png)" in report
    assert (out / "loss.png").stat().st_size > 5000
    gain = float(printed.split(" nats/token better")[0].rsplit(": ", 1)[1])
    assert gain > 0.5, f"after 60 steps the model should beat the unigram baseline clearly:\n{printed}"
    assert "->" in printed, "samples are printed"


def test_demo_falls_back_to_python_code_when_offline(monkeypatch, tmp_path, capsys):
    import lmforge.eval.demo as demo_module
    from lmforge.data.corpora import CorpusUnavailableError

    def offline(name, **kwargs):
        raise CorpusUnavailableError(f"npm is unreachable for {name}")

    seen = {}
    monkeypatch.setattr(demo_module, "fetch_corpus", offline)
    import lmforge.eval.report
    import lmforge.train.loop

    monkeypatch.setattr(lmforge.train.loop, "train",
                        lambda recipe, out: seen.setdefault("inputs", recipe.data.inputs))
    monkeypatch.setattr(lmforge.eval.report, "write_report", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(demo_module, "tokenizer_for", lambda data: None)
    monkeypatch.setattr(demo_module, "shards_for", lambda *a: None)
    with pytest.raises(SystemExit):
        demo_module.demo(tmp_path / "x")
    assert seen["inputs"] == ["python-code"]
    assert "falling back to the offline python-code corpus" in capsys.readouterr().err
