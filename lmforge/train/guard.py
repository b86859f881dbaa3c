"""Skip optimizer steps whose loss or gradient norm is not finite; abort after too many in a row.

One bad batch (a rare spike) should cost one skipped step, not the run; a run that keeps producing
inf / nan has diverged and should stop with advice rather than silently train on garbage.

Under fp16 with dynamic loss scaling (`train.precision: fp16`), an overflow of the SCALED gradients is
routine and not a sign of divergence: the loss is multiplied by a large scale so that small gradients
survive in fp16, and when the scaled gradients overflow the GradScaler skips the update and halves the
scale (Micikevicius et al. 2018, "Mixed Precision Training", §3.2; torch.amp.GradScaler). Such steps
are counted apart, as `overflows`, and do not count toward the abort; see `NonFiniteGuard.check`.
"""

from __future__ import annotations

import math

# Below this loss scale an overflowing gradient is not the scaler's business: the loss was scaled DOWN
# and the gradient still overflowed, so the model (not the scale) produces inf / nan. Without a floor a
# diverged fp16 run would halve the scale forever (down to 0, where 0 x 1/0 = nan overflows too) and
# never abort. DeepSpeed's DynamicLossScaler stops at the same floor (min_scale=1).
MIN_LOSS_SCALE = 1.0


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""

    exit_code = 1  # the CLI prints the message (which says what to try) without a traceback


class NonFiniteGuard:
    """check() each step before optimizer.step(): True applies the update, False skips it (the caller
    zeroes the gradients). Raises NonFiniteError after `max_consecutive` bad steps in a row.

    Counters (saved in checkpoints, logged as metrics):
    - skipped: bad steps over the whole run, i.e. a non-finite loss, or a non-finite gradient norm that
      is not an fp16 overflow. Each adds to `consecutive`, a finite step resets it.
    - overflows: fp16 overflow steps over the whole run (finite loss, non-finite gradient norm, loss
      scale >= MIN_LOSS_SCALE): skipped and left to the GradScaler, which halves the scale. They neither
      add to nor reset `consecutive`: a run of bad steps interleaved with overflows still aborts.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1: got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0  # bad steps in the current run of them
        self.skipped = 0  # bad steps over the whole training run
        self.overflows = 0  # fp16 overflow steps over the whole training run

    def check(self, loss: float, grad_norm: float, *, step: int | None = None,
              scale: float | None = None) -> bool:
        """True: apply the update. `scale` is the step's fp16 loss scale (None: no gradient scaler); the
        gradient norm is that of the unscaled gradients (after `GradScaler.unscale_`)."""
        loss, grad_norm = float(loss), float(grad_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        if scale is not None and math.isfinite(loss) and scale >= MIN_LOSS_SCALE:
            self.overflows += 1
            return False
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            at = f" at step {step}" if step is not None else ""
            scaled = f", loss scale={scale}" if scale is not None else ""
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient norm{at} "
                f"(last: loss={loss}, grad_norm={grad_norm}{scaled}; {self.skipped} skipped in total); the run "
                "has diverged. Try a lower learning rate or a longer warmup, enable gradient clipping "
                "(optim.grad_clip), use bf16 rather than fp16, and check the data for empty or corrupt "
                "batches; resume from the last checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
        self.overflows = int(state.get("overflows", 0))  # absent in checkpoints written before fp16 scaling
