"""What a person sees of a run: metrics as JSONL (+ TensorBoard), a loss-curve PNG, progress (a bar, or lines in a log).

`RUN_DIR/metrics.jsonl` holds one JSON object per logged step, "step" first. Each line is flushed to
the OS as it is written, which survives the process being killed (SIGKILL included); only a machine
crash can lose the last lines, and a resumed run rewrites the file up to its checkpoint anyway
(`truncate_after`), so no fsync per step. Non-finite floats are written as NaN / Infinity, which
Python's json reads back.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmforge._files import write_text_atomic

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so json and TensorBoard take them."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not a number or string; "
                        "log numbers (floats, ints, 0-d tensors) or strings") from None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of `run_dir/metrics.jsonl`; a line cut short by a kill is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class MetricsLogger:
    """Appends `{"step": ..., **values}` per `log` call to `run_dir/metrics.jsonl`, and writes the numeric
    values as TensorBoard scalars to `run_dir/tensorboard/` when `tensorboard` is installed."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a")
        self._tensorboard = tensorboard
        self._writer = None  # created on the first log, so a resume can purge its stale events first
        self._purge_step: int | None = None

    def log(self, step: int, **values: Any) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, int(step))

    def truncate_after(self, step: int) -> None:
        """Drop records with step > `step` (a resumed run logs them again) and any line cut short, by an
        atomic rewrite: a crash leaves either the old or the new file. TensorBoard events past `step`
        are purged when its writer opens."""
        self._file.close()
        kept = [r for r in read_metrics(self.run_dir) if not isinstance(r.get("step"), int) or r["step"] <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")
        self._purge_step = step + 1

    def _tensorboard_writer(self):
        if self._writer is None and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # torch raises this when the tensorboard package is missing
                self._tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_losses(run_dir: str | Path, *, train_key: str = "loss", val_key: str = "val_loss",
                lr_key: str = "lr") -> Path | None:
    """Write `run_dir/loss.png`: train loss (and val loss where logged) vs step, the learning rate on a
    twin axis. Returns its path, or None when matplotlib is missing or nothing has been logged."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    records = read_metrics(run_dir)

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        return [s for s, _ in pairs], [v for _, v in pairs]

    steps, train = series(train_key)
    if not steps:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg renders without a display and touches no global pyplot state
    ax = fig.add_subplot()
    ax.plot(steps, train, label="train", color="tab:blue", linewidth=1)
    val_steps, val = series(val_key)
    if val_steps:
        ax.plot(val_steps, val, "o-", label="validation", color="tab:orange", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    lr_steps, lr = series(lr_key)
    if lr_steps:
        twin = ax.twinx()
        twin.plot(lr_steps, lr, "--", label="learning rate", color="tab:gray", linewidth=1)
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    tmp = path.with_suffix(".tmp.png")  # readers never see a half-written image
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _duration(seconds: float) -> str:
    """5:07, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar:
    """Progress over optimiser steps: loss, lr, tokens/s, MFU and the time left.

    On a terminal (stderr), or with `force`, a tqdm bar whose postfix shows the values. Otherwise (a log
    file, Slurm, torchrun with redirected output) a plain line on stdout at the first step, then at most
    every `interval` seconds, and at the last step, e.g.
    `step 120/2000  loss 3.4521  lr 2.91e-04  tok/s 12,345  mfu 31.2%  eta 1:02:03`.
    `write` prints a line (the eval results) above the bar or among the plain lines; stdout is flushed
    each time, so a log file shows them at once. enabled=False (ranks other than 0) silences it entirely.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *, force: bool = False,
                 interval: float = 30.0) -> None:
        self.enabled = enabled
        shown = enabled and (force or sys.stderr.isatty())
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=not shown, file=sys.stderr)
        self._plain = enabled and not shown
        self._total, self._initial, self._step = total_steps, initial_step, initial_step
        self._interval = interval
        self._started = time.monotonic()
        self._last_line: float | None = None  # when the last plain line was printed

    def update(self, step: int, *, loss: float | None = None, lr: float | None = None,
               tokens_per_s: float | None = None, mfu: float | None = None) -> None:
        values = {}
        if loss is not None:
            values["loss"] = f"{loss:.4f}"
        if lr is not None:
            values["lr"] = f"{lr:.2e}"
        if tokens_per_s is not None:
            values["tok/s"] = f"{tokens_per_s:,.0f}"
        if mfu is not None and math.isfinite(mfu):
            values["mfu"] = f"{100 * mfu:.1f}%"
        if self._plain:
            self._line(step, values)
        elif not self._bar.disable:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(step - self._step)
        self._step = step

    def _line(self, step: int, values: dict[str, str]) -> None:
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self._interval or step >= self._total
        if not due:
            return
        self._last_line = now
        done = step - self._initial
        eta = _duration((now - self._started) / done * (self._total - step)) if done > 0 else "?"
        fields = "  ".join(f"{key} {value}" for key, value in values.items())
        self.write(f"step {step}/{self._total}  {fields}  eta {eta}")

    def write(self, line: str) -> None:
        """One line on stdout, above the bar when there is one (tqdm.write keeps the bar intact)."""
        if self.enabled:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self._bar.close()


def summarize(values: list[float]) -> dict[str, float]:
    """median, mean, min and max of `values` (e.g. per-step tokens/s) for reports."""
    if not values:
        raise ValueError("summarize needs at least one value; got an empty list (log some steps first)")
    return {"median": float(statistics.median(values)), "mean": float(statistics.fmean(values)),
            "min": float(min(values)), "max": float(max(values))}
