"""Keep freed memory in the process: glibc's defaults cost a CPU training step hundreds of page faults per MB.

PyTorch's CPU tensors come straight from ``malloc``. With glibc's defaults a block of more than 128 KiB (raised
step by step up to the largest block freed) is a fresh ``mmap`` and every free above 128 KiB at the heap's top is
handed back to the kernel, so each training step maps, faults in (one fault per 4 KiB page, and a fault costs
several microseconds in a virtual machine) and unmaps again the same activations. An OverLoCK-T step at batch 8
took ~200 000 page faults this way. ``keep_freed_memory`` sets glibc's two thresholds so that blocks up to
32 MiB (the most glibc allows) come from the heap and freed memory stays for the next step, as jemalloc and
tcmalloc (the allocators PyTorch's own CPU launcher ``torch.backends.xeon.run_cpu`` preloads) do by default.
The process then holds its high-water mark instead of shrinking between steps; the numbers computed are the
same. Elsewhere than glibc (macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top
ENV_VAR = "OVERLOCK_KEEP_FREED_MEMORY"  # "0" turns it off for the command-line tools

_state = {"kept": False}


def _libc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory(enable: bool = True) -> bool:
    """Keep freed memory for reuse (``enable``) or go back to glibc's fixed default thresholds (128 KiB).

    Process-wide; returns whether glibc took the setting (False where the C library is not glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    mmap_at, trim_at = (MMAP_THRESHOLD, TRIM_THRESHOLD) if enable else (128 << 10, 128 << 10)
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_at)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_at))
    if not enable:
        libc.malloc_trim(0)
    _state["kept"] = ok and enable
    return ok


def release_free_memory() -> bool:
    """Hand the free heap back to the kernel now (``malloc_trim``), e.g. before reading a resident-set baseline."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def kept() -> bool:
    """Whether ``keep_freed_memory`` is in force in this process."""
    return _state["kept"]


def keep_for_command() -> bool:
    """What the command-line tools call: ``keep_freed_memory()`` unless ``OVERLOCK_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return keep_freed_memory()
