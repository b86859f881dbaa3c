"""Skip optimizer steps whose loss or gradient norm is not finite; abort after too many in a row.

One bad batch (an overflow, a rare spike) should cost one skipped step, not the run; a run that keeps
producing inf / nan has diverged and should stop with advice rather than silently train on garbage.
"""

from __future__ import annotations

import math


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """check() each step before optimizer.step(): True applies the update, False skips it (the caller
    zeroes the gradients). Raises NonFiniteError after `max_consecutive` skipped steps in a row."""

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1: got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # non-finite steps in the current run of them
        self.skipped = 0  # non-finite steps over the whole training run

    def check(self, loss: float, grad_norm: float, *, step: int | None = None) -> bool:
        loss, grad_norm = float(loss), float(grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            at = f" at step {step}" if step is not None else ""
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient norm{at} "
                f"(last: loss={loss}, grad_norm={grad_norm}; {self.skipped} skipped in total); the run "
                "has diverged. Try a lower learning rate or a longer warmup, enable gradient clipping "
                "(optim.grad_clip), use bf16 rather than fp16, and check the data for empty or corrupt "
                "batches; resume from the last checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
