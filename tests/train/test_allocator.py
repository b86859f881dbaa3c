"""keep_freed_memory: after it, freeing and re-allocating a large buffer reuses the process's pages instead
of faulting in fresh zeroed ones. Measured in a subprocess, so the test process keeps glibc's defaults."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from lmforge.train.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB, touched
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    default, kept = _probe("default"), _probe("keep")
    assert kept["tuned"] is True
    # glibc's default hands a 64 MiB block back to the OS on free: every round faults all its pages in again
    assert min(default["faults"][4:]) > pages // 2, default
    # kept: the first rounds fault pages in while the heap grows (once or twice, depending on what else was
    # allocated in between), the steady state reuses them
    assert max(kept["faults"][4:]) < pages // 20, kept
