"""Helpers for the command-line tests: small synthetic ImageFolders and running ``overlock`` in-process."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_image_folder(root, n_train: int = 16, n_val: int = 6, classes=COLOURS, size: int = 24, seed: int = 0):
    """Noisy colour patches with a random bright square: learnable, not trivial to memorise by pixel."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, colour in classes.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = np.clip(rng.normal(colour, 40, size=(size, size, 3)), 0, 255)
                x, y = rng.integers(0, size - 8, 2)
                img[y:y + 8, x:x + 8] = rng.integers(0, 255, 3)
                Image.fromarray(img.astype(np.uint8)).save(os.path.join(folder, f"{name}_{i:03d}.png"))
    return str(root)


def run_cli(*argv):
    """Run ``overlock`` in this process; returns (exit code, stdout, stderr)."""
    from overlock.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
            if not isinstance(e.code, int) and e.code is not None:
                err.write(str(e.code))
    return code, out.getvalue(), err.getvalue()


def run_subprocess(*argv, timeout=600, **kw):
    """Run ``python -m overlock ...`` in a fresh process (what users do)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "overlock", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def start_subprocess(*argv):
    """``python -m overlock ...`` started in the background (to be killed), stderr kept for the error report."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "overlock", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def kill_when(proc, steps_csv, min_step, timeout=240, step_column=2):
    """``kill -9`` ``proc`` as soon as its steps.csv lists step ``min_step`` or later."""
    start = time.time()
    while time.time() - start < timeout:
        if os.path.exists(steps_csv):
            lines = open(steps_csv).read().splitlines()[1:]
            if lines and int(lines[-1].split(",")[step_column]) >= min_step:
                assert proc.poll() is None, "the run finished before it could be killed"
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for steps")


# a fast recipe for tests: tiny model, small images, light augmentation
FAST = ["--model", "test_overlock", "--img-size", "32", "-b", "8", "--warmup-epochs", "0", "--cooldown-epochs", "0",
        "--aa", "", "--reprob", "0", "--hflip", "0", "-j", "0", "--lr", "2e-3"]
