"""NaN/inf guard: skip bad steps, count them, abort with advice after too many in a row, resume its state."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.train.guard import NonFiniteError, NonFiniteGuard


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


def test_state_round_trips_through_json_and_keeps_counting():
    guard = NonFiniteGuard(max_consecutive=3)
    guard.check(math.nan, 1.0)
    guard.check(math.nan, 1.0)
    restored = NonFiniteGuard(max_consecutive=3)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.state_dict() == {"consecutive": 2, "skipped": 2}
    with pytest.raises(NonFiniteError):
        restored.check(math.nan, 1.0)


def test_accepts_tensors_and_rejects_bad_limit():
    import torch

    assert not NonFiniteGuard().check(torch.tensor(float("nan")), torch.tensor(1.0))
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        NonFiniteGuard(max_consecutive=0)
