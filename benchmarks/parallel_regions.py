"""Where a step's wall time goes: inside OpenMP parallel regions, per kernel, and outside any region (issue #12).

On the 2-core VMs one core works alone whenever the step is outside a parallel region (Python, dispatch, autograd,
allocation, serial ops) while the other spins; inside a region both can work. This preloads a small shim
(``gomp_regions.c``, built with the system C compiler) that times every top-level ``GOMP_parallel`` call, which
PyTorch's ``parallel_for``, MKL, oneDNN and overlock's kernels all go through, and runs real steps of the
benchmark's configuration (``overlock.benchmark``: channels_last, the auxiliary loss, AdamW). Nested regions are
part of their outer region; time between regions is "outside". Works for any timm model, so two can be compared.

    PYTHONPATH=. python benchmarks/parallel_regions.py --model overlock_t --mode train -b 8
    PYTHONPATH=. python benchmarks/parallel_regions.py --model convnext_tiny --mode infer -b 1 --steps 20
"""
from __future__ import annotations

import argparse
import bisect
import collections
import ctypes
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("gomp_regions.c")
_PRELOADED = "OVERLOCK_GOMP_REGIONS_SHIM"


def _reexec_with_shim() -> None:
    """Build the shim and run this script again with it preloaded (the dynamic linker binds GOMP_parallel at load)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("parallel_regions.py: needs a C compiler (gcc or $CC) to build gomp_regions.c")
    out = Path(tempfile.mkdtemp(prefix="gomp_regions_")) / "gomp_regions.so"
    subprocess.run([cc, "-O2", "-fPIC", "-shared", str(SHIM_SOURCE), "-o", str(out), "-ldl"], check=True)
    env = dict(os.environ, **{_PRELOADED: str(out)})
    env["LD_PRELOAD"] = " ".join(p for p in (str(out), os.environ.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class _Symbols:
    """Function names of code offsets in a shared library, from ``nm`` (static symbols too: OpenMP outlines each
    region into a local ``*._omp_fn.N`` function)."""

    def __init__(self):
        self.tables = {}

    def __call__(self, lib: str, offset: int) -> str:
        if lib not in self.tables:
            rows = []
            for flags in (["--defined-only"], ["-D", "--defined-only"]):
                try:
                    out = subprocess.run(["nm", "-C", *flags, lib], capture_output=True, text=True).stdout
                except OSError:
                    out = ""
                for line in out.splitlines():
                    parts = line.split(" ", 2)
                    if len(parts) == 3 and parts[1] in "tTwW":
                        try:
                            rows.append((int(parts[0], 16), parts[2]))
                        except ValueError:
                            pass
                if rows:
                    break
            rows.sort()
            self.tables[lib] = ([r[0] for r in rows], [r[1] for r in rows])
        addresses, names = self.tables[lib]
        i = bisect.bisect_right(addresses, offset) - 1
        return names[i] if i >= 0 else f"0x{offset:x}"


@functools.lru_cache(maxsize=None)
def _demangle(name: str) -> str:
    """C++ names ``nm -C`` left mangled (a clone suffix such as ``._omp_fn.0`` stops it)."""
    if not name.startswith("_Z") or not shutil.which("c++filt"):
        return name
    out = subprocess.run(["c++filt", name.split(".")[0]], capture_output=True, text=True).stdout.strip()
    if out and not out.startswith("_Z"):
        return out
    # c++filt gives up on some lambda-heavy names: take the first identifier after parallel_for that names no namespace
    at = name.find("parallel_for")
    i = at + len("parallel_for") if at >= 0 else len(name)
    while i < len(name):
        digits = re.match(r"\d+", name[i:])
        if not digits:
            i += 1
            continue
        length, i = int(digits.group()), i + len(digits.group())
        word = name[i:i + length]
        i += length
        if word not in ("at", "c10", "native", "internal", "_GLOBAL__N_1"):
            return f"void at::internal::invoke_parallel<at::parallel_for<{word}..."
    return name


def family(lib: str, name: str) -> str:
    """A short label for a region's function: its library and the kernel it runs."""
    name = re.sub(r"(\s*\[clone )?\._omp_fn\.\d+\]?", "", _demangle(name))
    inner = re.search(r"parallel_for<(?:[\w:]+::)?(?:\(anonymous namespace\)::)?([A-Za-z_][\w:]*)", name)
    if name.startswith(("void at::internal::invoke_parallel", "at::internal::invoke_parallel")) and inner:
        name = f"at::parallel_for<{inner.group(1)}>"
    stem = Path(lib).name.split(".so")[0].split("-")[0]
    return f"{stem}: {name[:90]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="overlock_t")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="recorded steps (after --warmup unrecorded ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25, help="rows printed")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if _PRELOADED not in os.environ:
        _reexec_with_shim()

    import torch

    from overlock.benchmark import BenchConfig, _build, _step_fn, environment
    shim = ctypes.CDLL(os.environ[_PRELOADED])
    shim.pr_count.restype = ctypes.c_long
    torch.set_flush_denormal(True)
    cfg = BenchConfig(model=args.model, mode=args.mode, batch_size=args.batch_size, img_size=args.img_size)
    model, x = _build(cfg)
    step = _step_fn(cfg, model, x)
    for _ in range(args.warmup):
        step()
    shim.pr_start()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = time.perf_counter() - t0
    shim.pr_stop()
    with tempfile.TemporaryDirectory() as tmp:
        dump = os.path.join(tmp, "regions.txt")
        if shim.pr_dump(dump.encode()) != 0:
            sys.exit("parallel_regions.py: the shim could not write its records")
        records = [line.split(maxsplit=3) for line in open(dump)]
    symbols = _Symbols()
    label_of = functools.lru_cache(maxsize=None)(lambda lib, offset: family(lib, symbols(lib, offset)))
    inside, calls, before = collections.Counter(), collections.Counter(), collections.Counter()
    previous = None
    for start, end, offset, lib in records:
        start, end, lib = float(start), float(end), lib.strip()
        label = label_of(lib, int(offset, 16))
        inside[label] += end - start
        calls[label] += 1
        if previous is not None:
            before[label] += start - previous
        previous = end
    n = args.steps
    in_regions = sum(inside.values())
    per_step = lambda s: s / n * 1e3  # noqa: E731
    outside = wall - in_regions
    print(f"{args.model} {args.mode} b{args.batch_size} {args.img_size}px, {torch.get_num_threads()} threads: step "
          f"{per_step(wall):.0f} ms = {per_step(in_regions):.0f} ms in {len(records) / n:.0f} parallel regions + "
          f"{per_step(outside):.0f} ms outside any ({outside / wall:.0%})")
    print(f"{'ms/step':>8} {'calls':>6} {'outside before':>14}  region")
    rows = []
    for label, seconds in inside.most_common():
        rows.append(dict(region=label, ms_per_step=per_step(seconds), calls_per_step=calls[label] / n,
                         outside_before_ms_per_step=per_step(before[label])))
    for r in rows[:args.top]:
        print(f"{r['ms_per_step']:8.1f} {r['calls_per_step']:6.0f} {r['outside_before_ms_per_step']:14.1f}  "
              f"{r['region']}")
    if args.json:
        out = dict(command=" ".join(["python", *sys.argv]), environment=environment(), config=vars(args),
                   step_ms=per_step(wall), in_regions_ms=per_step(in_regions), outside_ms=per_step(outside),
                   regions_per_step=len(records) / n, regions=rows)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
