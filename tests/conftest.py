import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_config():
    return json.loads((DATA / "config.json").read_text())


@pytest.fixture(scope="session")
def expected():
    with np.load(DATA / "expected.npz") as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm of the difference over norm of the reference (the project's exactness measure)."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def has_avx512f() -> bool:
    """The CPU has AVX-512F (the native kernels' 512-bit code runs; tests compare it with the 256-bit code)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False
