"""``overlock.allocator``: with freed memory kept, a loop of large tensors stops page-faulting (glibc only)."""
import json
import os
import subprocess
import sys

import pytest

from overlock import allocator

GLIBC = allocator._libc() is not None

# faults per iteration (median of 15) of a loop that makes and frees one 8 MiB tensor, in a fresh interpreter
PROBE = """
import json, resource, sys, torch
from overlock import allocator
applied = allocator.keep_for_command() if sys.argv[1] == "command" else allocator.keep_freed_memory(sys.argv[1] == "1")
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(2 << 20).fill_(1.0)
counts = []
for _ in range(15):
    f0 = faults()
    torch.empty(2 << 20).fill_(1.0)
    counts.append(faults() - f0)
print(json.dumps(dict(applied=applied, kept=allocator.kept(), faults_per_iter=sorted(counts)[7])))
"""


def _probe(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=dict(os.environ, **env)).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_kept_memory_is_reused_without_page_faults():
    kept, default = _probe("1"), _probe("0")
    assert kept["applied"] and kept["kept"] and default["applied"] and not default["kept"]
    # 8 MiB = 2048 pages of 4 KiB: faulted in again on every iteration unless the freed block is reused
    assert default["faults_per_iter"] > 1000, default
    assert kept["faults_per_iter"] < 50, kept


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_command_line_setting_and_its_opt_out():
    assert _probe("command")["kept"]
    off = _probe("command", OVERLOCK_KEEP_FREED_MEMORY="0")
    assert not off["applied"] and not off["kept"]  # glibc's own dynamic thresholds: no mallopt call made


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    assert allocator.keep_freed_memory() is False and allocator.release_free_memory() is False
    assert not allocator.kept()
