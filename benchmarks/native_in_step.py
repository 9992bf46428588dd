"""Wall time of every hand-written kernel call inside a CPU training step, per kernel and input shape (issue #12).

``torch.profiler`` does not see the ctypes calls and charges them, with Python glue, to the custom autograd
functions around them (``_Gelu`` read 6.2 ms per call on 8x256x56x56 there, 2.1 ms timed here); a kernel timed
alone runs with warm caches and reads faster than inside the step. This wraps each kernel entry point of
``overlock.ops.native`` in ``perf_counter`` and runs real training steps (forward with the auxiliary loss,
backward), so the totals are what a step spends in each kernel.

    PYTHONPATH=. python benchmarks/native_in_step.py --model overlock_t -b 8 --steps 3
"""
from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import overlock  # noqa: F401  (registers the models)
from overlock.ops import native

# the entry points that run a kernel (the rest of the module builds, loads and describes the library)
NOT_KERNELS = {"available", "cpu_isa", "used_here", "status", "describe"}


def wrap_kernels(record):
    """Replace each kernel entry point of ``native`` with a timed one; returns a function that restores them."""
    originals = {}
    for name in dir(native):
        fn = getattr(native, name)
        if name.startswith("_") or name in NOT_KERNELS or not callable(fn) or getattr(fn, "__module__", "") != \
                native.__name__:
            continue
        originals[name] = fn

        @functools.wraps(fn)
        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            out = _fn(*args, **kwargs)
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            record[(_name, shape)].append(time.perf_counter() - start)
            return out
        setattr(native, name, timed)
    return lambda: [setattr(native, k, v) for k, v in originals.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="overlock_t")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 3 untimed ones)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=40, help="rows printed")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model = timm.create_model(args.model, use_ds=True).to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch_size,))

    def step():
        logits, aux = model(x, return_aux=True)
        (F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux, target)).backward()
        model.zero_grad(set_to_none=True)

    record = collections.defaultdict(list)
    restore = wrap_kernels(record)
    try:
        for _ in range(3):
            step()
        record.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
    finally:
        restore()
    rows = sorted(record.items(), key=lambda kv: -sum(kv[1]))
    total = sum(sum(v) for v in record.values()) / args.steps * 1e3
    print(f"{args.model} b{args.batch_size} {args.img_size}px, {torch.get_num_threads()} threads: "
          f"step {step_ms:.0f} ms, of which {total:.0f} ms in the hand-written kernels ({native.describe()})")
    print(f"{'kernel':30} {'first input':22} {'calls/step':>10} {'ms/step':>8} {'median ms':>9}")
    for (name, shape), times in rows[:args.top]:
        print(f"{name:30} {str(shape):22} {len(times) // args.steps:10d} {sum(times) / args.steps * 1e3:8.2f} "
              f"{statistics.median(times) * 1e3:9.3f}")


if __name__ == "__main__":
    main()
