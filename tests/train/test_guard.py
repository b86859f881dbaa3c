"""NaN/inf guard: skip bad steps, count them, abort with advice after too many in a row, resume its state;
fp16 overflows of the scaled gradients are the gradient scaler's business and never abort the run."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.train.guard import MIN_LOSS_SCALE, NonFiniteError, NonFiniteGuard


def test_finite_steps_pass_and_bad_ones_are_skipped_and_counted():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(2.5, 1.0)
    assert not guard.check(math.nan, 1.0)
    assert not guard.check(2.5, math.inf)
    assert guard.check(2.4, 0.9), "a finite step resets the run of bad ones"
    assert not guard.check(-math.inf, 0.5)
    assert (guard.consecutive, guard.skipped) == (1, 3)


def test_aborts_after_max_consecutive_with_a_clear_message():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.check(math.nan, math.nan, step=40)
    with pytest.raises(NonFiniteError, match="2 consecutive steps") as info:
        guard.check(math.inf, 3.0, step=41)
    message = str(info.value)
    for needed in ("step 41", "loss=inf", "grad_norm=3.0", "lower learning rate", "grad_clip", "data"):
        assert needed in message, f"the abort message should mention {needed!r}: {message}"
    assert isinstance(info.value, FloatingPointError)
    assert info.value.exit_code == 1, "the CLI turns it into its message and exit code 1, no traceback"


def test_state_round_trips_through_json_and_keeps_counting():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.check(math.nan, 1.0)
    guard.check(math.nan, 1.0)
    restored = NonFiniteGuard(max_consecutive=3)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == {"consecutive": 2, "skipped": 2, "overflows": 0}
    with pytest.raises(NonFiniteError):
        restored.check(math.nan, 1.0)


def test_accepts_tensors_and_rejects_bad_limit():
    import torch

    assert not NonFiniteGuard().check(torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        NonFiniteGuard(max_consecutive=0)


def test_fp16_overflows_are_skipped_and_counted_apart_without_aborting():
    guard = NonFiniteGuard(max_consecutive=1)  # any bad step would abort at once
    for _ in range(20):  # e.g. the first steps at a too large initial scale, halved each time
        assert not guard.check(6.9, math.inf, scale=2.0**16)
    assert not guard.check(6.9, math.nan, scale=MIN_LOSS_SCALE)
    assert (guard.consecutive, guard.skipped, guard.overflows) == (0, 0, 21)
    assert guard.check(6.8, 0.7, scale=2.0**10)


def test_overflows_neither_add_to_nor_reset_a_run_of_bad_steps():
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.check(math.nan, math.nan, scale=2.0**16), "a non-finite loss is bad even with a scaler"
    assert not guard.check(6.9, math.inf, scale=2.0**15)  # an overflow in between
    assert (guard.consecutive, guard.skipped, guard.overflows) == (1, 1, 1)
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps.*loss scale=16384.0"):
        guard.check(math.inf, math.inf, step=3, scale=2.0**14)


def test_overflow_below_the_minimum_scale_counts_as_divergence():
    """At a scale below 1 the loss was scaled down and the gradient still overflowed: halving further
    cannot help (down to a scale of 0, which overflows forever), so these steps count toward the abort."""
    guard = NonFiniteGuard(max_consecutive=2)
    assert not guard.check(6.9, math.inf, scale=MIN_LOSS_SCALE / 2)
    with pytest.raises(NonFiniteError, match="loss scale=0.25"):
        guard.check(6.9, math.inf, step=9, scale=MIN_LOSS_SCALE / 4)
    assert guard.overflows == 0


def test_state_without_overflows_loads_as_zero_overflows():
    """Checkpoints written before fp16 scaling hold only consecutive and skipped."""
    guard = NonFiniteGuard()
    guard.load_state_dict({"consecutive": 1, "skipped": 4})
    assert guard.state_dict() == {"consecutive": 1, "skipped": 4, "overflows": 0}
