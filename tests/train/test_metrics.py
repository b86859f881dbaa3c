"""Metrics JSONL (+ resume truncation), TensorBoard events, the loss PNG, the progress bar, summaries."""

import json
import math
import time

import numpy as np
import pytest
import torch

from lmforge.train.metrics import MetricsLogger, ProgressBar, plot_losses, read_metrics, summarize


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_json_object_per_log_with_step_first(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, loss=torch.tensor(2.5), lr=np.float32(1e-3), tokens=512, note="warmup")
        log.log(2, loss=2.25, grad_norm=torch.tensor(0.5, dtype=torch.bfloat16))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith('{"step": 1, '), "step must come first"
    first, second = (json.loads(line) for line in lines)
    assert first == {"step": 1, "loss": 2.5, "lr": pytest.approx(1e-3), "tokens": 512, "note": "warmup"}
    assert isinstance(first["loss"], float) and isinstance(first["tokens"], int)
    assert second == {"step": 2, "loss": 2.25, "grad_norm": 0.5}


def test_lines_are_on_disk_before_close(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, loss=1.0)
    assert _lines(tmp_path) == [{"step": 1, "loss": 1.0}], "a killed run must keep what it logged"
    log.close()


def test_non_numbers_are_refused(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log, pytest.raises(TypeError, match="not a number"):
        log.log(1, loss=[1.0, 2.0])


def test_truncate_after_drops_later_steps_and_torn_lines(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 7):
        log.log(step, loss=10.0 - step)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the process was killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]

    resumed = MetricsLogger(tmp_path, tensorboard=False)  # the loop resumes from a step-4 checkpoint
    resumed.truncate_after(4)
    for step in range(5, 8):
        resumed.log(step, loss=float(step))
    resumed.close()
    records = _lines(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7], "no duplicate steps after a resume"
    assert [r["loss"] for r in records[4:]] == [5.0, 6.0, 7.0], "later steps come from the resumed run"
    assert not list(tmp_path.glob("*.tmp")), "the atomic rewrite leaves no temporary file"


def test_truncate_after_on_a_fresh_run(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.truncate_after(0)
    log.log(1, loss=1.0)
    log.close()
    assert _lines(tmp_path) == [{"step": 1, "loss": 1.0}]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        log.log(1, loss=3.0, lr=1e-3, note="text is not a scalar")
        log.log(2, loss=2.0, lr=2e-3, val_loss=2.5)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr", "val_loss"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 3.0), (2, 2.0)]


def test_tensorboard_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        for step in range(1, 7):
            log.log(step, loss=float(step))
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<counter>. A resumed run is a later
    # process; in this one process, within one second, the counter would decide, compared as text (10 < 9)
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.02)
    with MetricsLogger(tmp_path) as log:
        log.truncate_after(4)
        for step in range(5, 8):
            log.log(step, loss=10.0 * step)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60),
                                                                    (7, 70)]


def test_tensorboard_missing_is_fine(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("TensorBoard logging requires TensorBoard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with MetricsLogger(tmp_path) as log:
        log.log(1, loss=1.0)
    assert _lines(tmp_path) == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


def test_loss_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 41):
            values = {"loss": 5.0 * math.exp(-step / 10) + 1.0, "lr": 1e-3 * min(1.0, step / 10)}
            if step % 10 == 0:
                values["val_loss"] = values["loss"] + 0.1
            log.log(step, **values)
    path = plot_losses(tmp_path)
    assert path == tmp_path / "loss.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000, "a plot with axes, two curves and a legend is more than a few KB"
    image = imread(path)
    assert image.shape[:2] == (450, 800)
    assert image[..., :3].std() > 0.05, "the image should not be blank"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_loss_plot_without_data_or_matplotlib(tmp_path, monkeypatch):
    assert plot_losses(tmp_path) is None  # nothing logged yet
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, loss=1.0)
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_losses(tmp_path) is None
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("enabled, force", [(False, False), (True, False), (True, True)])
def test_progress_bar(enabled, force, capsys):
    bar = ProgressBar(10, 3, enabled=enabled, force=force)
    for step in range(4, 11):
        bar.update(step, loss=2.0, lr=3e-4, tokens_per_s=1234.5, mfu=0.42)
    bar.write("step 10: val 1.9")
    bar.close()
    out, err = capsys.readouterr()  # pytest's captured streams are not terminals
    assert ("step 10: val 1.9" in out) == enabled, "eval lines print unless the bar is disabled"
    if force:
        assert "10/10" in err and "loss=2.0000" in err and "mfu=42.0%" in err and "tok/s=1,234" in err
        assert "step 4/10" not in out, "no plain lines beside a bar"
    else:
        assert err == "", "no bar when stderr is not a terminal"
        # instead plain lines (within 30 s: the first and the last step only)
        plain = [line for line in out.splitlines() if line.startswith("step ") and "/" in line.split()[1]]
        assert [line.split()[1] for line in plain] == (["4/10", "10/10"] if enabled else [])


def test_progress_lines_for_a_log_file(capsys, monkeypatch):
    """Without a terminal (Slurm, a redirected torchrun): a line at the first step, then at most every
    `interval` seconds, and at the last, with the time left from the pace since the start (or resume)."""
    import lmforge.train.metrics as metrics

    clock = iter([1000.0, 1010.0, 1020.0, 1039.0, 1040.0, 1050.0, 1060.0])  # start, then one per update
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    bar = ProgressBar(106, 100, interval=30.0)  # resumed at step 100
    for step in range(101, 107):
        bar.update(step, loss=2.0, lr=3e-4, tokens_per_s=12345.6, mfu=float("nan"))
    bar.close()
    assert capsys.readouterr().out.splitlines() == [
        "step 101/106  loss 2.0000  lr 3.00e-04  tok/s 12,346  eta 0:50",  # 10 s per step so far, 5 to go
        "step 104/106  loss 2.0000  lr 3.00e-04  tok/s 12,346  eta 0:20",  # 30 s after the first line
        "step 106/106  loss 2.0000  lr 3.00e-04  tok/s 12,346  eta 0:00",  # the last step
    ]
    assert metrics._duration(3723.4) == "1:02:03" and metrics._duration(59.6) == "1:00"


def test_progress_bar_counts_from_the_resumed_step(capsys):
    bar = ProgressBar(100, 40, force=True)
    bar.update(41, loss=1.0, mfu=float("nan"))  # NaN MFU (no peak) is left out
    assert bar._bar.n == 41
    bar.close()
    err = capsys.readouterr().err
    assert "41/100" in err and "mfu" not in err


def test_summarize():
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "mean": 4.0, "min": 1.0, "max": 10.0}
    assert summarize([5]) == {"median": 5.0, "mean": 5.0, "min": 5.0, "max": 5.0}
    with pytest.raises(ValueError, match="empty"):
        summarize([])

