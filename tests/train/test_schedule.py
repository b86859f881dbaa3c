"""Learning-rate schedules: warmup convention, endpoints, shapes and validation."""

from __future__ import annotations

import math

import pytest

from lmforge.train.schedule import SCHEDULES, ScheduleConfig, lr_factor


def factors(cfg: ScheduleConfig, total: int) -> list[float]:
    return [lr_factor(cfg, s, total) for s in range(total)]


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_warmup_starts_at_one_over_warmup_and_reaches_peak(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=4, min_lr_ratio=0.1)
    f = factors(cfg, 100)
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]), "step 0 is the first update: factor 1/warmup, not 0"
    assert max(f) == pytest.approx(1.0)


def test_constant_is_one_after_warmup():
    assert factors(ScheduleConfig(kind="constant"), 10) == [1.0] * 10


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_decays_reach_the_floor_at_total_steps_and_stay(kind):
    cfg = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cfg, 10, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 150, 100) == pytest.approx(0.1), "steps past the end stay at the floor"
    f = factors(cfg, 100)[9:]
    assert all(a >= b for a, b in zip(f, f[1:])), "no increase after warmup"
    assert f[-1] > 0.1, "the last update (step total - 1) is just above the floor"


def test_cosine_matches_formula():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.2)
    for step in (10, 25, 55, 80, 99):
        p = (step - 10) / 90
        assert lr_factor(cfg, step, 100) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lr_factor(cfg, 55, 100) == pytest.approx(0.6), "the midpoint is halfway between peak and floor"


def test_linear_matches_formula():
    cfg = ScheduleConfig(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert factors(cfg, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_inverse_sqrt_is_vaswani_eq3_normalised_to_peak_one():
    w = 16
    cfg = ScheduleConfig(kind="inverse_sqrt", warmup_steps=w)
    for step in (0, 5, 15, 16, 100, 999):
        s = step + 1  # the paper's 1-based step_num
        vaswani = min(s**-0.5, s * w**-1.5)
        assert lr_factor(cfg, step, 1000) == pytest.approx(vaswani / w**-0.5)
    assert lr_factor(cfg, w - 1, 1000) == pytest.approx(1.0), "peak 1.0 at step_num == warmup"
    assert lr_factor(cfg, 4 * w - 1, 1000) == pytest.approx(0.5), "then decays as 1/sqrt: 4x the steps, half the lr"
    assert lr_factor(ScheduleConfig(kind="inverse_sqrt"), 3, 10) == pytest.approx(0.5), "no warmup: 1/sqrt(step+1)"


def test_wsd_holds_then_decays_with_one_minus_sqrt():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    f = factors(cfg, 100)
    assert f[5:80] == [1.0] * 75, "stable phase at the peak until the last 20% of the run"
    for step in (80, 85, 90, 99):
        assert f[step] == pytest.approx(1 - math.sqrt((step - 80) / 20))
    assert lr_factor(cfg, 100, 100) == 0.0


def test_wsd_decay_never_starts_inside_warmup():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=8, min_lr_ratio=0.0, decay_fraction=1.0)
    f = factors(cfg, 10)
    assert f[7] == pytest.approx(1.0)
    assert f[8] == pytest.approx(1.0) and f[9] == pytest.approx(1 - math.sqrt(0.5))


def test_warmup_equal_to_total_is_all_warmup():
    assert factors(ScheduleConfig(kind="cosine", warmup_steps=4), 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kind="exponential"), "valid kinds: .*constant.*cosine.*inverse_sqrt.*linear.*wsd"),
        (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
        (dict(min_lr_ratio=1.5), r"min_lr_ratio must lie in \[0, 1\]"),
        (dict(min_lr_ratio=-0.1), r"min_lr_ratio must lie in \[0, 1\]"),
        (dict(decay_fraction=2.0), r"decay_fraction must lie in \[0, 1\]"),
    ],
)
def test_invalid_configs_raise_with_the_constraint(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleConfig(**kwargs)


def test_invalid_calls_raise():
    with pytest.raises(ValueError, match=r"warmup_steps \(20\) exceeds total_steps \(10\)"):
        lr_factor(ScheduleConfig(warmup_steps=20), 0, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_factor(ScheduleConfig(), -1, 10)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        lr_factor(ScheduleConfig(), 0, 0)


def test_every_kind_is_positive_and_at_most_one():
    for kind in SCHEDULES:
        f = factors(ScheduleConfig(kind=kind, warmup_steps=3, min_lr_ratio=0.0), 50)
        assert all(0.0 < x <= 1.0 + 1e-12 for x in f), f"{kind}: every update must get a factor in (0, 1]"
