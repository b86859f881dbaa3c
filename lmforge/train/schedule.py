"""Learning-rate schedules as a pure function of the step: `lr = base_lr * lr_factor(cfg, step, total_steps)`.

Stateless on purpose: the loop sets `group["lr"] = base_lr * lr_factor(...)` before every update, so a
resumed run needs only the step counter, never a scheduler state dict.

Step convention: `step` is 0-based and counts optimizer updates (step 0 is the first update). Linear
warmup gives step s the factor (s + 1) / warmup_steps, so the first update already moves the weights
(factor 1/warmup, not 0) and step warmup_steps - 1 is the first at the peak 1.0 (nanochat's
`get_lr_multiplier`). The decaying schedules reach the floor min_lr_ratio at step == total_steps, one
past the last update (nanoGPT's `get_lr`); steps past total_steps stay at the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ScheduleConfig:
    """How the learning rate moves over training.

    kind: constant | cosine | linear | inverse_sqrt | wsd (see `lr_factor`).
    warmup_steps: updates of linear warmup from 1/warmup_steps to 1.0 (0 = start at the peak).
    min_lr_ratio: floor of cosine, linear and wsd, as a fraction of the base lr (unused by
        constant and inverse_sqrt).
    decay_fraction: wsd only: the last fraction of the run spent decaying.
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind {self.kind!r} is unknown; valid kinds: {sorted(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0: got {self.warmup_steps}; use 0 for no warmup")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1]: got {self.min_lr_ratio}; "
                             "it is the final lr as a fraction of the peak (0.1 is common)")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1]: got {self.decay_fraction}; "
                             "it is the share of the run spent decaying in 'wsd' (0.1-0.2 is common)")


def _warmup(cfg: ScheduleConfig, step: int) -> float:
    return (step + 1) / cfg.warmup_steps


def _progress(start: int, step: int, total_steps: int) -> float:
    """Fraction of the decay span [start, total_steps] done at `step`, clamped to [0, 1]."""
    return min(1.0, max(0.0, (step - start) / max(1, total_steps - start)))


def _constant(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    return 1.0


def _cosine(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Cosine annealing (Loshchilov & Hutter 2017, SGDR eq. 5, one cycle, no restarts) down to the floor."""
    p = _progress(cfg.warmup_steps, step, total_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _linear(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    p = _progress(cfg.warmup_steps, step, total_steps)
    return 1.0 - (1.0 - cfg.min_lr_ratio) * p


def _inverse_sqrt(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Vaswani et al. 2017, eq. 3: lr ∝ min(s^-0.5, s * w^-1.5), with s = step + 1 (the paper's step_num is 1-based).

    Multiplied by sqrt(w) so the peak, at s == w, is 1.0: min(s / w, sqrt(w / s)). The paper's
    d_model^-0.5 factor is left to the base lr. With warmup_steps 0, w is 1: the factor is 1 / sqrt(s).
    """
    w = max(1, cfg.warmup_steps)
    s = step + 1
    return min(s / w, math.sqrt(w / s))


def _wsd(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM, the WSD schedule): hold the peak, then decay over the last
    decay_fraction of the run.

    The decay has the 1 - sqrt shape of Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations"), which beat the linear cooldown there; MiniCPM itself decays
    exponentially. The decay never starts before warmup ends.
    """
    start = max(cfg.warmup_steps, total_steps - round(cfg.decay_fraction * total_steps))
    if step < start:
        return 1.0
    p = _progress(start, step, total_steps)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - math.sqrt(p))


SCHEDULES = {"constant": _constant, "cosine": _cosine, "linear": _linear, "inverse_sqrt": _inverse_sqrt,
             "wsd": _wsd}


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """The multiplier of the base lr for the update at 0-based `step` of a `total_steps`-update run."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1: got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0 (0 is the first update): got {step}")
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({cfg.warmup_steps}) exceeds total_steps ({total_steps}); "
                         "lower warmup_steps or train for more steps")
    if cfg.kind not in SCHEDULES:  # the config may have been mutated after construction
        raise ValueError(f"schedule kind {cfg.kind!r} is unknown; valid kinds: {sorted(SCHEDULES)}")
    if cfg.kind != "inverse_sqrt" and step < cfg.warmup_steps:
        return _warmup(cfg, step)
    return SCHEDULES[cfg.kind](cfg, step, total_steps)
