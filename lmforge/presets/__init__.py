"""Named model presets as plain data, one file per family.

Each preset is a dict of `ModelConfig` fields whose comment names the upstream config it
reproduces. `debug-*` presets are tiny sizes for tests and CPU runs.
"""

from __future__ import annotations

import copy
from typing import Any

from lmforge.presets import decoder, encoder, encoder_decoder

_PRESETS: dict[str, dict[str, Any]] = {**decoder.PRESETS, **encoder.PRESETS, **encoder_decoder.PRESETS}


def names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(names())}")
    return copy.deepcopy(_PRESETS[name])
