"""Per-tap time of oneDNN's channels_last depthwise forward by kernel size, on this CPU.

Fills ``overlock.ops.depthwise.WIDENED_KERNELS`` for a vector ISA: a kernel size whose time per tap is well above
that of a larger size runs faster zero-padded to it when ``(big / k)^2 * per_tap(big) < per_tap(k)``.
Usage: ``.venv/bin/python benchmarks/depthwise_sweep.py`` (prints one row per map shape; run on a quiet machine).
"""
import time

import torch
import torch.nn.functional as F


def per_tap_ns(x: torch.Tensor, k: int, repeats: int = 9) -> float:
    C = x.shape[1]
    w = torch.randn(C, 1, k, k).contiguous(memory_format=torch.channels_last)
    b = torch.randn(C)
    times = []
    with torch.inference_mode():
        F.conv2d(x, w, b, padding=k // 2, groups=C)
        for _ in range(repeats):
            t = time.perf_counter()
            F.conv2d(x, w, b, padding=k // 2, groups=C)
            times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 4] * 1e9 / (x.numel() * k * k)


def main() -> None:
    print(f"# {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# ns per tap and output element; rows: batch, channels, map side")
    sizes = list(range(3, 32, 2))
    print("shape | " + " | ".join(f"k{k}" for k in sizes))
    for B, C, H in ((8, 128, 28), (8, 64, 56), (16, 256, 14), (1, 256, 14)):
        x = torch.randn(B, C, H, H).contiguous(memory_format=torch.channels_last)
        row = [per_tap_ns(x, k) for k in sizes]
        print(f"{B}x{C}x{H}x{H} | " + " | ".join(f"{t:.4f}" for t in row), flush=True)


if __name__ == "__main__":
    main()
