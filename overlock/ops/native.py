"""Hand-written CPU kernels (``csrc/*.c``), compiled with the system C compiler on first use, called by ctypes.

Why C through ctypes and not a PyTorch C++ extension: the kernel needs no PyTorch headers, so it compiles in
about a second (a C++ extension takes a minute and needs ninja), and a machine without a compiler simply keeps
PyTorch's kernels. The library links to the OpenMP runtime that PyTorch itself loaded, so it shares torch's
thread pool and thread count (``torch.set_num_threads``) instead of starting a second pool.

The compiled library is cached in ``$OVERLOCK_CACHE`` (default ``$XDG_CACHE_HOME/overlock`` or
``~/.cache/overlock``) under a name that hashes the source, the compiler and the OpenMP runtime.
``OVERLOCK_NATIVE=0`` switches the kernels off (PyTorch's kernels everywhere, same values up to summation order).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["available", "used_here", "cpu_isa", "NATIVE_ISAS", "depthwise_conv2d_same", "depthwise_conv2d_taps",
           "depthwise_conv2d_taps_gelu", "depthwise_conv2d_taps_grn", "depthwise_conv2d_taps_norm",
           "depthwise_weight_grad_same", "depthwise_gelu_grad", "bn_branch_backward", "bn_batch_stats",
           "bn_running_update", "channel_affine_acc_", "na2d_softmax_av", "na2d_softmax_av_pair",
           "na2d_softmax_av_backward", "grn_scale", "grn_backward_sums", "grn_backward_apply", "se_gate", "gelu",
           "gelu_backward", "bias_gelu_", "silu_mul_", "status", "describe", "disabled", "narrow_vectors",
           "context_concat", "whole_blocks"]

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("depthwise_avx2.c", "depthwise_avx512.c", "neighborhood_avx2.c", "neighborhood_avx512.c",
                        "grn_avx2.c", "gelu_avx2.c", "gelu_avx512.c", "se_avx2.c", "batchnorm_avx2.c", "concat_avx2.c",
                        "blocks_avx2.c")]
# included by the sources (part of the cache key)
HEADERS = [Path(__file__).with_name("csrc") / name for name in (
    "exp_neg_avx2.h", "exp_neg_avx512.h", "gelu_avx2.h", "gelu_math.h", "depthwise_common.h", "neighborhood_common.h")]
_ADDRESS = ctypes.c_void_p  # float buffers, passed as plain addresses (data_ptr()): no ctypes object per call
_reason = "not loaded yet"
# CPU vector ISAs on which the model runs these kernels instead of PyTorch's. Real AVX2 EPYC, 2 threads: depthwise
# forward 1.8-2.4x oneDNN at 13x13-17x17 and 1.2-1.6x at 3x3, ContMix aggregation 2.1-3x, GRN's scale 2.5-4x,
# GELU 1.1-1.4x forward and 1.6x gradient (benchmarks/README.md).
# AVX-512 Xeon (2 cores, 2026-12-05): whole model with them against oneDNN's 512-bit kernels, alternated in one
# process: training step b8 2.83 -> 2.21 s, batch-1 forward 97 -> 72 ms, batch 16 857 -> 779 ms. There the large
# depthwise forward, the depthwise weight gradient, GELU and ContMix's forward aggregation run 512-bit vectors
# (csrc/*_avx512.c, same bits).
NATIVE_ISAS = {"AVX2", "AVX512"}
_disabled = 0  # > 0 inside `disabled()`


def _cache_dir() -> Path:
    if os.environ.get("OVERLOCK_CACHE"):
        return Path(os.environ["OVERLOCK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "overlock"


def _openmp_runtime() -> Optional[Path]:
    """The GNU-compatible OpenMP library PyTorch loaded (its ``libgomp``, or Intel's ``libiomp5``), if any."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/lib" in line}
    except OSError:
        return None
    for prefix in ("libgomp", "libiomp5"):
        for p in sorted(paths):
            if os.path.basename(p).startswith(prefix) and ".so" in p:
                return Path(p)
    return None


def _compile(cc: str, omp: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [str(Path(tmp) / f"{src.stem}.o") for src in SOURCES]
        lib = Path(tmp) / "kernels.so"
        for src, obj in zip(SOURCES, objects):  # OpenMP pragmas compiled in; runtime chosen at link time
            subprocess.run([cc, "-O3", "-fPIC", "-fopenmp", "-c", str(src), "-o", obj],
                           check=True, capture_output=True, text=True)
        # link against torch's runtime by file name (not -fopenmp, which would add the system's libgomp)
        subprocess.run([cc, "-shared", *objects, "-o", str(lib), f"-L{omp.parent}", f"-l:{omp.name}",
                        f"-Wl,-rpath,{omp.parent}", "-lm"], check=True, capture_output=True, text=True)
        os.replace(lib, target)  # atomic: concurrent first uses each build, one wins, none sees half a file


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    global _reason
    if os.environ.get("OVERLOCK_NATIVE", "1") == "0":
        _reason = "off (OVERLOCK_NATIVE=0)"
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"off (written for x86-64 Linux, this is {platform.system()} {platform.machine()})"
        return None
    if cpu_isa() not in ("AVX2", "AVX512"):
        _reason = f"off (the CPU lacks AVX2: {cpu_isa()})"
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    omp = _openmp_runtime()
    if cc is None or omp is None:
        _reason = "off (no C compiler on PATH)" if cc is None else "off (PyTorch loaded no GNU OpenMP runtime)"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
        digest = hashlib.sha256(version.encode() + str(omp).encode())
        for src in SOURCES + HEADERS:
            digest.update(src.read_bytes())
        target = _cache_dir() / f"kernels_avx2-{digest.hexdigest()[:16]}.so"
        if not target.exists():
            _compile(cc, omp, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        names = ", ".join(src.name for src in SOURCES)
        _reason = f"off (building {names} with {cc} failed: {detail.strip()[:300]})"
        log.warning("overlock: native CPU kernels %s; PyTorch's kernels are used", _reason)
        return None
    lib.overlock_depthwise_avx512_set.restype = ctypes.c_int
    lib.overlock_depthwise_avx512_set.argtypes = [ctypes.c_int]
    lib.overlock_depthwise_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_int] * 7
    lib.overlock_depthwise_gelu_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_gelu_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_int] * 6
    lib.overlock_depthwise_grn_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_grn_avx2.argtypes = [_ADDRESS] * 7 + [ctypes.c_int] * 7
    lib.overlock_depthwise_grn_inplace_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_grn_inplace_avx2.argtypes = [_ADDRESS] * 6 + [ctypes.c_int] * 7
    lib.overlock_depthwise_ln_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_ln_avx2.argtypes = [_ADDRESS] * 7 + [ctypes.c_float] + [_ADDRESS] * 2 + [ctypes.c_int] * 6
    lib.overlock_depthwise_wgrad_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_gelu_grad_avx2.restype = ctypes.c_int
    lib.overlock_depthwise_gelu_grad_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_int] * 6
    lib.overlock_bn_branch_backward_avx2.restype = ctypes.c_int
    lib.overlock_bn_branch_backward_avx2.argtypes = [_ADDRESS] * 12 + [ctypes.c_int, _ADDRESS] + [ctypes.c_int] * 7
    lib.overlock_depthwise_wgrad_avx2.argtypes = [_ADDRESS] * 3 + [ctypes.c_int] * 7
    lib.overlock_depthwise_taps.restype = None
    lib.overlock_depthwise_taps.argtypes = [_ADDRESS] * 2 + [ctypes.c_int] * 3
    lib.overlock_bn_batch_stats_avx2.restype = ctypes.c_int
    lib.overlock_bn_batch_stats_avx2.argtypes = ([_ADDRESS, ctypes.c_long, ctypes.c_int] + [_ADDRESS] * 2
                                                 + [ctypes.c_double] + [_ADDRESS] * 2)
    lib.overlock_bn_running_update.restype = None
    lib.overlock_bn_running_update.argtypes = [_ADDRESS] * 3 + [ctypes.c_int, ctypes.c_double]
    lib.overlock_channel_affine_acc_avx2.restype = ctypes.c_int
    lib.overlock_channel_affine_acc_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_long] + [ctypes.c_int] * 2
    lib.overlock_se_gate_avx2.restype = ctypes.c_int
    lib.overlock_se_gate_avx2.argtypes = ([_ADDRESS, ctypes.c_int, ctypes.c_long, ctypes.c_int] + [_ADDRESS] * 2
                                          + [ctypes.c_int] + [_ADDRESS] * 3)
    lib.overlock_grn_scale_avx2.restype = ctypes.c_int
    lib.overlock_grn_scale_avx2.argtypes = [_ADDRESS] * 3 + [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    lib.overlock_grn_sumsq_avx2.restype = ctypes.c_int
    lib.overlock_grn_sumsq_avx2.argtypes = [_ADDRESS] * 2 + [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    lib.overlock_grn_backward_sums_avx2.restype = ctypes.c_int
    lib.overlock_grn_backward_sums_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    lib.overlock_grn_backward_apply_avx2.restype = ctypes.c_int
    lib.overlock_grn_backward_apply_avx2.argtypes = [_ADDRESS] * 5 + [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    lib.overlock_na2d_softmax_av_avx2.restype = ctypes.c_int
    lib.overlock_na2d_softmax_av_avx2.argtypes = (  # q, keys x 2, biases x 2, projection biases x 2, v, out, sizes
        [_ADDRESS] + [ctypes.c_long] * 3 + [_ADDRESS] * 2 + [ctypes.c_long] * 3 + [_ADDRESS] * 5
        + [ctypes.c_long] * 4 + [_ADDRESS] + [ctypes.c_long] * 4 + [ctypes.c_int] * 8)
    lib.overlock_na2d_softmax_av_backward_avx2.restype = ctypes.c_int
    lib.overlock_na2d_softmax_av_backward_avx2.argtypes = [_ADDRESS] * 7 + [ctypes.c_int] * 7 + [ctypes.c_long] * 9
    lib.overlock_gelu_avx2.restype = ctypes.c_int
    lib.overlock_gelu_avx2.argtypes = [_ADDRESS] * 2 + [ctypes.c_long]
    lib.overlock_bias_gelu_avx2.restype = ctypes.c_int
    lib.overlock_bias_gelu_avx2.argtypes = [_ADDRESS] * 2 + [ctypes.c_long] * 3  # x, bias, rows, cols, row stride
    lib.overlock_bias_silu_mul_avx2.restype = ctypes.c_int
    lib.overlock_bias_silu_mul_avx2.argtypes = [_ADDRESS] * 3 + [ctypes.c_long] * 2  # a, bias, b, rows, cols
    lib.overlock_grn_scale_bias_avx2.restype = ctypes.c_int
    lib.overlock_grn_scale_bias_avx2.argtypes = [_ADDRESS] * 4 + [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    lib.overlock_silu_mul_avx2.restype = ctypes.c_int
    lib.overlock_silu_mul_avx2.argtypes = [_ADDRESS] * 2 + [ctypes.c_long]
    lib.overlock_context_concat_avx2.restype = ctypes.c_int
    lib.overlock_context_concat_avx2.argtypes = (  # x, ctx, prior with pixel strides, w1, w2, b, out, pixels
        [_ADDRESS, ctypes.c_long, ctypes.c_int, _ADDRESS, ctypes.c_long, _ADDRESS, ctypes.c_long, ctypes.c_int]
        + [_ADDRESS] * 4 + [ctypes.c_long])
    lib.overlock_gelu_backward_avx2.restype = ctypes.c_int
    lib.overlock_gelu_backward_avx2.argtypes = [_ADDRESS] * 3 + [ctypes.c_long]
    _declare_blocks(lib)
    _reason = f"on ({target})"
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (and not switched off by :func:`disabled`)."""
    return _disabled == 0 and _library() is not None


@functools.lru_cache(maxsize=None)
def cpu_isa() -> str:
    """The vector ISA PyTorch's CPU kernels use here (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        return "unknown"


def _declare_blocks(lib: ctypes.CDLL) -> None:
    """The whole-block calls of csrc/blocks_avx2.c (their arguments in the order of the C prototypes)."""
    a, i, f, n = _ADDRESS, ctypes.c_int, ctypes.c_float, ctypes.c_long
    lib.overlock_blocks_set_sgemm.restype = None
    lib.overlock_blocks_set_sgemm.argtypes = [a, a]
    lib.overlock_blocks_linear.restype = i
    lib.overlock_blocks_linear.argtypes = [a, i, a, i, i, a, i, i, i, i, f]
    lib.overlock_blocks_batch_linear.restype = i
    lib.overlock_blocks_batch_linear.argtypes = [a, a, a, i, i, i, i, i, f]
    lib.overlock_repconv_block_avx2.restype = i
    lib.overlock_repconv_block_avx2.argtypes = (
        [a, a, i, i, i, i] + [a, a, i, i, a, a, f, a] + [a, a, i, i] + [a, a, i, a, a]
        + [a, i, a, i] + [a, a, i, i, a, i] + [a, i, a])
    lib.overlock_focus_block_avx2.restype = i
    lib.overlock_focus_block_avx2.argtypes = (
        [a, n, i, a, n, i, a, n, a, a, a, a, i, i, i]
        + [a, a, i, i, a, a, f, a, a] + [a, a, i, i] + [a, i, a, i, a, a, a, i, a] + [a, a, i, i]
        + [a, i, a, i, i, i, a, a, i, a, a, i, i, i, a, a, a, i] + [a, a, i, a, a] + [a, i]
        + [a, a, i, i, a, a, f, a] + [a, i, a, i, a, a, i, i, a, i, a, i, a])


def _torch_blas(name: str) -> Optional[int]:
    """The address of the BLAS routine ``name`` in PyTorch's library (MKL's ``sgemm_`` and ``cblas_sgemm_batch``,
    which its float32 matrix products call, are inside libtorch_cpu), or None where there is none."""
    try:
        torch_lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(getattr(torch_lib, name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _same_products(lib: ctypes.CDLL) -> bool:
    """Whether the blocks' 1x1s give PyTorch's bits: ``F.linear`` / ``addmm_`` against the C call, for both weight
    layouts, a column-major left operand, and a few-row and a many-row shape (PyTorch may route products elsewhere,
    e.g. to oneDNN, in other builds or settings)."""
    gen = torch.Generator().manual_seed(0)
    for M, K, N in ((49, 64, 96), (400, 32, 48)):
        x = torch.randn(M, K, generator=gen)
        for stored_t in (False, True):
            w = torch.randn(K, N, generator=gen).t() if stored_t else torch.randn(N, K, generator=gen)
            for beta in (0.0, 1.0):
                acc = torch.randn(M, N, generator=gen)
                want = acc.clone().addmm_(x, w.t()) if beta else torch.nn.functional.linear(x, w)
                got = acc.clone()
                lib.overlock_blocks_linear(got.data_ptr(), N, x.data_ptr(), K, 0, w.data_ptr(), int(stored_t), M, K,
                                           N, beta)
                if not torch.equal(got, want):
                    return False
        xc = torch.randn(K, M, generator=gen).t()  # column-major (M, K)
        w = torch.randn(N, K, generator=gen)
        got = torch.empty(M, N)
        lib.overlock_blocks_linear(got.data_ptr(), N, xc.data_ptr(), M, 1, w.data_ptr(), 0, M, K, N, 0.0)
        if not torch.equal(got, torch.matmul(xc, w.t())):
            return False
    return True


def _same_batched_products(lib) -> bool:
    """Whether the blocks' per-sample 1x1s (a weight scaled per sample) give ``torch.bmm`` / ``baddbmm_``'s bits,
    for both weight layouts."""
    gen = torch.Generator().manual_seed(0)
    B, M, K, N = 3, 100, 32, 48
    x, scale = torch.randn(B, M, K, generator=gen), torch.rand(B, K, generator=gen) + 0.5
    for stored_t in (False, True):
        w = torch.randn(K, N, generator=gen).t() if stored_t else torch.randn(N, K, generator=gen)
        ws = w.t().unsqueeze(0) * scale.reshape(B, K, 1)  # the layout the product takes, as the blocks write it
        for beta in (0.0, 1.0):
            acc = torch.randn(B, M, N, generator=gen)
            want = acc.clone().baddbmm_(x, ws) if beta else torch.bmm(x, ws)
            got = acc.clone()
            if (lib.overlock_blocks_batch_linear(got.data_ptr(), x.data_ptr(), ws.data_ptr(), int(stored_t), B, M, K,
                                                 N, beta) != 0 or not torch.equal(got, want)):
                return False
    return True


@functools.lru_cache(maxsize=None)
def _blocks() -> Optional[ctypes.CDLL]:
    lib = _library()
    address = None if lib is None else _torch_blas("sgemm_")
    if address is None:
        return None
    batched = _torch_blas("cblas_sgemm_batch")
    lib.overlock_blocks_set_sgemm(address, batched)
    with torch.inference_mode(False), torch.no_grad():
        if not _same_products(lib):
            lib.overlock_blocks_set_sgemm(None, None)
            log.info("overlock: PyTorch's matrix products differ from its sgemm_ here; blocks run op by op")
            return None
        if batched is not None and not _same_batched_products(lib):
            lib.overlock_blocks_set_sgemm(address, None)  # one sample at a time only
            log.info("overlock: PyTorch's bmm differs from cblas_sgemm_batch here; batches run op by op")
    return lib


def whole_blocks() -> Optional[ctypes.CDLL]:
    """The library with the whole-block calls (csrc/blocks_avx2.c) ready, or None: kernels off or not built, no
    ``sgemm_`` in PyTorch's library, or its products not PyTorch's bits (checked once per process). Without a
    batched product of PyTorch's bits, the calls refuse more than one sample."""
    return None if _disabled else _blocks()


def used_here() -> bool:
    """Whether the model uses the kernels on this machine: built and loaded, and a CPU in :data:`NATIVE_ISAS`.
    Not for traced or compiled code (asking the ISA there breaks the graph): callers test that first."""
    return cpu_isa() in NATIVE_ISAS and available()


def status() -> str:
    """Built and loaded (with the library's path) or off, and why."""
    _library()
    return _reason


def describe() -> str:
    """One line for ``overlock info`` and benchmark records: :func:`status` and the CPUs the model uses them on."""
    return f"{status()}; used on {', '.join(sorted(NATIVE_ISAS))}"


class disabled:
    """Context manager: PyTorch's kernels only, inside (for tests and side-by-side timing)."""

    def __enter__(self):
        global _disabled
        _disabled += 1

    def __exit__(self, *exc):
        global _disabled
        _disabled -= 1


class narrow_vectors:
    """Context manager: the kernels' 256-bit code even on a CPU with AVX-512 (their 512-bit code gives the same bits:
    tests compare the two). No effect where the kernels are not built."""

    def __enter__(self):
        lib = _library()
        self._was = None if lib is None else lib.overlock_depthwise_avx512_set(0)
        return self

    def __exit__(self, *exc):
        if self._was is not None:
            _library().overlock_depthwise_avx512_set(self._was)


def _real(*tensors: Optional[torch.Tensor]) -> bool:
    """Tensors with memory behind them: not the fake or functional ones of a trace (torch.compile, export)."""
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _taps(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The kernel as ``(kh*kw, C)``: a vector of channels per tap, the layout the C loop reads; with ``flip``, the
    kernel turned 180 degrees (the input gradient's conv).

    Made on every call, never cached: optimizers such as PyTorch's fused AdamW write parameters in place without
    moving their version counter, so a copy kept between calls could go stale unnoticed.
    """
    w = weight.detach()
    C = w.shape[0]
    if (w.dim() == 4 and w.shape[1] == 1 and C % 8 == 0 and w.dtype == torch.float32 and w.device.type == "cpu"
            and w.is_contiguous() and _real(w) and _disabled == 0):
        lib = _library()
        if lib is not None:
            taps = w.shape[2] * w.shape[3]
            out = torch.empty(taps, C)
            lib.overlock_depthwise_taps(w.data_ptr(), out.data_ptr(), C, taps, flip)
            return out
    if flip:
        w = w.flip(-2, -1)
    return w.reshape(C, -1).t().contiguous()


def depthwise_conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          dilation: int = 1, flip: bool = False, out: Optional[torch.Tensor] = None
                          ) -> Optional[torch.Tensor]:
    """``F.conv2d(x, weight, bias, padding=(d * (kh // 2), d * (kw // 2)), dilation=d, groups=C)`` on float32
    channels_last CPU maps.

    Returns ``None`` where the kernel does not apply (then call PyTorch): native kernels off, channels not a
    multiple of 8, an even kernel side, or tensors that are not float32 CPU. The result is channels_last.
    ``flip``: convolve with the kernel turned 180 degrees instead (the input gradient), without a flipped copy.
    ``out``: a channels_last float32 map of ``x``'s shape to write into (a reused scratch map) instead of a new one.
    """
    lib = _library() if _disabled == 0 else None
    if lib is None or not _real(x, weight, bias) or x.dim() != 4 or weight.dim() != 4:
        return None
    N, C, H, W = x.shape
    kh, kw = weight.shape[-2:]
    if (C % 8 or kh % 2 == 0 or kw % 2 == 0 or weight.shape[0] != C or weight.shape[1] != 1
            or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu"
            or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != C))):
        return None
    x = x.contiguous(memory_format=torch.channels_last)
    w = _taps(weight, flip)
    b = None if bias is None else bias.contiguous()
    if out is not None and not (out.shape == x.shape and out.dtype == torch.float32 and out.device.type == "cpu"
                                and out.is_contiguous(memory_format=torch.channels_last) and _real(out)):
        return None
    y = torch.empty_like(x, memory_format=torch.channels_last) if out is None else out
    if N * H * W:
        rc = lib.overlock_depthwise_avx2(_ptr(x), _ptr(w), _ptr(b), _ptr(y), N, H, W, C, kh, kw, dilation)
        if rc != 0:
            return None
    return y


def depthwise_conv2d_taps(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], kh: int, kw: int
                          ) -> Optional[torch.Tensor]:
    """:func:`depthwise_conv2d_same` with the kernel already in the ``(kh*kw, C)`` layout (:func:`_taps`) and few
    checks: the batch-1 inference path of fused models, where the Python around a 14x14 conv cost more than the
    conv itself. ``x`` must be a float32 channels_last CPU map with ``C % 8 == 0`` (the caller checks); ``None``
    if the kernels are off."""
    lib = _library() if _disabled == 0 else None
    if lib is None:
        return None
    N, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if N * H * W and lib.overlock_depthwise_avx2(x.data_ptr(), taps.data_ptr(), _ptr(bias), y.data_ptr(), N, H, W,
                                                 C, kh, kw, 1) != 0:
        return None
    return y


def depthwise_conv2d_taps_gelu(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], kh: int, kw: int
                               ) -> Optional[torch.Tensor]:
    """``GELU(depthwise_conv2d_taps(...))`` with the very bits of the two kernels one after the other, GELU applied
    to each tile of pixels while it is in cache. Kernels of at most 3x3; ``None`` where it does not apply."""
    lib = _library() if _disabled == 0 else None
    if lib is None or kh * kw > 9:
        return None
    N, C, H, W = x.shape
    y = torch.empty_like(x, memory_format=torch.channels_last)
    if N * H * W and lib.overlock_depthwise_gelu_avx2(x.data_ptr(), taps.data_ptr(), _ptr(bias), y.data_ptr(), N, H,
                                                      W, C, kh, kw) != 0:
        return None
    return y


def depthwise_conv2d_taps_grn(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], kh: int, kw: int,
                              gamma: torch.Tensor, apply: bool = False, inplace: bool = False):
    """``(y, grn_scale(y, gamma))`` with ``y`` :func:`depthwise_conv2d_taps` (same bits) and GRN's per-sample
    channel scale ``(B, C, 1, 1)`` summed while each output row is in cache (the fused GRN-MLPs' conv, then GRN).
    With ``apply``, ``(y * scale, None)`` instead (the product's bits), the scale applied in the same call. With
    ``inplace`` (kernels of at most 3x3) ``y`` is written over ``x``, which the caller must own (no other views).
    Kernels of at most 3x3, float32 contiguous ``gamma`` of ``C``; ``None`` where it does not apply."""
    lib = _library() if _disabled == 0 else None
    N, C, H, W = x.shape
    if lib is None or kh * kw > 9 or H * W == 0:  # an empty map: GRN's own route defines its scale
        return None
    scale = x.new_empty(N, C, 1, 1)
    rows = x.new_empty(N * H * C)
    if inplace and kh <= 3 and kw <= 3:  # x, a fresh map, overwritten (its bytes are in cache; a new buffer's not)
        y = x
        rc = lib.overlock_depthwise_grn_inplace_avx2(x.data_ptr(), taps.data_ptr(), _ptr(bias), gamma.data_ptr(),
                                                     scale.data_ptr(), rows.data_ptr(), int(apply), N, H, W, C, kh,
                                                     kw)
    else:
        y = torch.empty_like(x, memory_format=torch.channels_last)
        rc = lib.overlock_depthwise_grn_avx2(x.data_ptr(), taps.data_ptr(), _ptr(bias), y.data_ptr(),
                                             gamma.data_ptr(), scale.data_ptr(), rows.data_ptr(), int(apply), N, H,
                                             W, C, kh, kw)
    if rc != 0:  # a refused shape or no memory: nothing written
        return None
    return (y, None) if apply else (y, scale)


def depthwise_conv2d_taps_norm(x: torch.Tensor, taps: torch.Tensor, bias: Optional[torch.Tensor], kh: int, kw: int,
                               ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                               identity_scale: Optional[torch.Tensor] = None,
                               identity_shift: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None):
    """``(y, LayerNorm over channels of y)`` with ``y`` :func:`depthwise_conv2d_taps` (same bits), the norm applied to
    each tile of pixels while it is still in cache: a fused block's conv-then-LayerNorm pair in one call. With
    ``identity_scale`` and/or ``identity_shift`` (``C`` floats) the returned ``y`` is ``y * scale + shift`` (after
    the norm has read it; the bits of ``torch.addcmul(shift, y, scale)``, ``y * scale`` or ``y + shift``): a residual
    identity prepared in the same pass. Kernels of at most 3x3; same input requirements as there, plus float32
    contiguous ``ln_weight``/``ln_bias`` and identity vectors of ``C``; ``y`` written into ``out`` if given (a float32
    channels_last CPU map of ``x``'s shape, e.g. a batch slice of a larger one). ``None`` where it does not apply."""
    lib = _library() if _disabled == 0 else None
    if lib is None or kh * kw > 9:
        return None
    N, C, H, W = x.shape
    affine = [t for t in (identity_scale, identity_shift) if t is not None]
    if any(t.numel() != C or t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"
           for t in affine):
        return None
    if out is not None and (out.shape != x.shape or out.dtype != torch.float32 or out.device.type != "cpu"
                            or not out.is_contiguous(memory_format=torch.channels_last)):
        return None
    y = torch.empty_like(x, memory_format=torch.channels_last) if out is None else out
    z = torch.empty_like(y)
    if N * H * W and lib.overlock_depthwise_ln_avx2(x.data_ptr(), taps.data_ptr(), _ptr(bias), y.data_ptr(),
                                                    z.data_ptr(), ln_weight.data_ptr(), ln_bias.data_ptr(), eps,
                                                    _ptr(identity_scale), _ptr(identity_shift), N, H, W, C, kh,
                                                    kw) != 0:
        return None
    return y, z


def depthwise_gelu_grad(grad_out: torch.Tensor, weight: torch.Tensor, gelu_input: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``GELU'(gelu_input) * grad_x``, ``grad_x`` the input gradient of a same-size depthwise conv of at most 3x3
    taps (dilation 1) with ``weight`` (``(C, 1, kh, kw)``), from its output gradient: the gradient reaching a GELU's
    input through the conv after it, in one pass (written into ``out`` if given: a channels_last map like
    ``grad_out``, which may be neither input). ``None`` where the kernels do not apply."""
    lib = _library() if _disabled == 0 else None
    kh, kw = weight.shape[-2:]
    if (lib is None or not _real(grad_out, weight, gelu_input, out) or grad_out.dim() != 4 or kh * kw > 9
            or kh % 2 == 0 or kw % 2 == 0 or grad_out.dtype != torch.float32 or grad_out.device.type != "cpu"
            or grad_out.shape[1] % 8 or weight.dtype != torch.float32 or weight.shape[0] != grad_out.shape[1]
            or weight.shape[1] != 1 or not _channels_last_like(grad_out, gelu_input, out)):
        return None
    N, C, H, W = grad_out.shape
    flipped = _taps(weight, flip=True)
    y = torch.empty_like(grad_out, memory_format=torch.channels_last) if out is None else out
    if N * H * W and lib.overlock_depthwise_gelu_grad_avx2(grad_out.data_ptr(), flipped.data_ptr(),
                                                           gelu_input.data_ptr(), y.data_ptr(), N, H, W, C, kh,
                                                           kw) != 0:
        return None
    return y


def depthwise_weight_grad_same(x: torch.Tensor, grad_out: torch.Tensor, kernel: Tuple[int, int], dilation: int = 1
                               ) -> Optional[torch.Tensor]:
    """The weight gradient ``(C, 1, kh, kw)`` of :func:`depthwise_conv2d_same` from its input and output
    gradient, or ``None`` where the kernel does not apply (as there)."""
    lib = _library() if _disabled == 0 else None
    kh, kw = kernel
    if (lib is None or not _real(x, grad_out) or x.dim() != 4 or x.shape != grad_out.shape or x.shape[1] % 8
            or kh % 2 == 0 or kw % 2 == 0 or kw > 64 or x.dtype != torch.float32 or grad_out.dtype != torch.float32
            or x.device.type != "cpu" or grad_out.device.type != "cpu"):
        return None
    N, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    g = grad_out.contiguous(memory_format=torch.channels_last)
    if N * H * W == 0:
        return x.new_zeros(C, 1, kh, kw)
    dw = x.new_empty(C, 1, kh, kw)  # the parameter's layout: autograd accumulates it without a copy
    if lib.overlock_depthwise_wgrad_avx2(_ptr(x), _ptr(g), _ptr(dw), N, H, W, C, kh, kw, dilation) != 0:
        return None
    return dw


def bn_branch_backward(x: torch.Tensor, weight: torch.Tensor, dilation: int, grad: torch.Tensor,
                       grad_sum: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       gamma: Optional[torch.Tensor], scratch: torch.Tensor, grad_x: Optional[torch.Tensor],
                       add: bool, need_w: bool) -> Optional[Tuple[Optional[torch.Tensor], torch.Tensor]]:
    """Backward of ``batch_norm(depthwise_conv2d_same(x, weight, dilation=dilation))`` in training (batch
    statistics ``mean``, ``invstd`` saved by the forward; ``grad_sum``: ``grad`` summed per channel) in one call
    (``csrc/batchnorm_avx2.c``): the conv's input gradient written into ``grad_x`` (added to it if ``add``), its
    weight gradient returned if ``need_w``, and ``dot`` (per channel, the sum of ``grad * (conv - mean)``: the
    BatchNorm weight gradient is ``dot * invstd``). ``scratch``: a map like ``x``, overwritten. ``None`` where the
    kernels do not apply (nothing written then)."""
    lib = _library() if _disabled == 0 else None
    kh, kw = weight.shape[-2:]
    if (lib is None or not _real(x, weight, grad, scratch, grad_x) or x.dim() != 4 or x.dtype != torch.float32
            or x.device.type != "cpu" or x.shape[1] % 8 or kh % 2 == 0 or kw % 2 == 0 or kw > 64
            or weight.dtype != torch.float32 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1
            or (gamma is not None and gamma.dtype != torch.float32)
            or not _channels_last_like(x, grad, scratch, grad_x)):
        return None
    N, C, H, W = x.shape
    dot = x.new_empty(C)
    dw = x.new_empty(C, 1, kh, kw) if need_w else None
    rows = x.new_empty(N * H * C)
    taps, flipped = _taps(weight), _taps(weight, flip=True)  # held here: the call reads them by address
    grad_sum, mean, invstd = (t.detach().float().contiguous() for t in (grad_sum, mean, invstd))
    gamma = None if gamma is None else gamma.detach().contiguous()
    rc = lib.overlock_bn_branch_backward_avx2(
        x.data_ptr(), taps.data_ptr(), flipped.data_ptr(), grad.data_ptr(), grad_sum.data_ptr(), mean.data_ptr(),
        invstd.data_ptr(), _ptr(gamma), scratch.data_ptr(), rows.data_ptr(), dot.data_ptr(), _ptr(grad_x),
        int(add), _ptr(dw), N, H, W, C, kh, kw, dilation)
    if rc != 0:
        return None
    return dw, dot


def _channels_last_like(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """``x`` a channels_last map and every other tensor given a channels_last map of its shape."""
    return x.is_contiguous(memory_format=torch.channels_last) and all(
        t is None or (t.shape == x.shape and t.dtype == x.dtype and t.is_contiguous(memory_format=torch.channels_last))
        for t in others)


def na2d_softmax_av(query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, value: torch.Tensor,
                    kernel_size: int, out: torch.Tensor) -> bool:
    """``out = na2d_av(softmax(query @ keys + bias), value)`` fused per pixel (no autograd), written into ``out``.

    ``query`` ``(B, G, H*W, c)``, ``keys`` ``(B, G, c, k*k)``, ``bias`` ``(G, H*W, k*k)``, ``value`` and ``out``
    ``(B, G, H, W, C)``, each with a contiguous last dimension (any other strides). Returns ``False`` (``out``
    untouched) where the kernel does not apply: kernels off, not float32 CPU, ``C`` not a multiple of 8, a map
    smaller than the window, or more than 1024 taps.
    """
    return _softmax_av(query, (keys,), (bias,), value[None], (kernel_size,), out[None])


def na2d_softmax_av_pair(query: torch.Tensor, keys_small: torch.Tensor, keys_large: torch.Tensor,
                         bias_small: torch.Tensor, bias_large: torch.Tensor, value: torch.Tensor, smk_size: int,
                         kernel_size: int, out: torch.Tensor, proj_bias: Optional[Tuple[torch.Tensor, ...]] = None
                         ) -> bool:
    """Both halves of ContMix's aggregation in one call: :func:`na2d_softmax_av` of ``value[0]`` with the small
    kernel and of ``value[1]`` with the large one, into ``out[0]`` and ``out[1]`` (``value``, ``out``:
    ``(2, B, G, H, W, C)``); the two keys tensors with the same strides (two slices of one product).

    With ``proj_bias`` (the projection's biases of each kernel, ``(s*s,)`` and ``(k*k,)``) the two biases are the
    relative position tables ``(G, 2s-1, 2s-1)`` and ``(G, 2k-1, 2k-1)``: the kernel sums each pixel's window
    biases itself (the bits of :func:`overlock.contmix.window_biases`) instead of reading them per pixel.
    """
    if keys_small.stride() != keys_large.stride():
        return False
    return _softmax_av(query, (keys_small, keys_large), (bias_small, bias_large), value, (smk_size, kernel_size),
                       out, proj_bias)


def _softmax_av(query, keys, biases, value, sizes, out, proj_bias=None) -> bool:
    lib = _library() if _disabled == 0 else None
    if lib is None or not _real(query, *keys, *biases, value, out, *(proj_bias or ())):
        return False
    _, B, G, H, W, C = value.shape
    k = max(sizes)
    tensors = (query, *keys, *biases, value, out, *(proj_bias or ()))
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors)
            or C % 8 or k * k > 1024 or H < k or W < k or out.shape != value.shape
            or value.stride(3) != W * value.stride(4) or out.stride(3) != W * out.stride(4)
            or query.shape[:3] != (B, G, H * W) or any(t.shape != (B, G, query.shape[3], s * s)
                                                      for t, s in zip(keys, sizes))):
        return False
    if proj_bias is not None and any(t.shape != (G, 2 * s - 1, 2 * s - 1) or p.shape != (s * s,)
                                     for t, p, s in zip(biases, proj_bias, sizes)):
        return False
    biases = [t.contiguous() for t in biases]
    pb = [None, None] if proj_bias is None else [p.contiguous() for p in proj_bias]
    k1 = sizes[1] if len(sizes) > 1 else 0
    rc = lib.overlock_na2d_softmax_av_avx2(
        query.data_ptr(), *query.stride()[:3], keys[0].data_ptr(), keys[-1].data_ptr(), *keys[0].stride()[:3],
        biases[0].data_ptr(), biases[-1].data_ptr(), _ptr(pb[0]), _ptr(pb[-1]), value.data_ptr(),
        *value.stride()[:3], value.stride(4), out.data_ptr(), *out.stride()[:3], out.stride(4), B, G, H, W,
        query.shape[3], C, sizes[0], k1)
    return rc == 0


def na2d_softmax_av_backward(query: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor, value: torch.Tensor,
                             grad_out: torch.Tensor, grad_value: torch.Tensor, kernel_size: int):
    """Gradients of :func:`na2d_softmax_av`: returns ``(grad_query, grad_keys, grad_bias)`` and writes the values'
    gradient into ``grad_value`` (shaped like ``value``, any strides with contiguous channels, as ``grad_out``);
    ``None`` where the kernel does not apply (as there, or more than 32 channels per head). ``query``, ``keys`` and
    ``bias`` must be contiguous."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _real(query, keys, bias, value, grad_out, grad_value):
        return None
    B, G, H, W, C = value.shape
    k = kernel_size
    tensors = (query, keys, bias, value, grad_out, grad_value)
    maps = (value, grad_out, grad_value)
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or C % 8 or C > 32
            or k * k > 1024 or H < k or W < k or any(t.shape != value.shape for t in maps)
            or any(t.stride(-1) != 1 or t.stride(2) != W * t.stride(3) for t in maps)
            or not all(t.is_contiguous() for t in (query, keys, bias))):
        return None
    grad_logits = query.new_empty(B, G, H * W, k * k)
    rc = lib.overlock_na2d_softmax_av_backward_avx2(
        _ptr(query), _ptr(keys), _ptr(bias), _ptr(value), _ptr(grad_out), _ptr(grad_logits), _ptr(grad_value),
        B, G, H, W, query.shape[-1], C, k, *(t.stride(i) for t in maps for i in (0, 1, 3)))
    if rc != 0:
        return None
    # logits = query @ keys + bias: the rest is two batched products and a sum (BLAS)
    return grad_logits @ keys.transpose(-1, -2), query.transpose(-1, -2) @ grad_logits, grad_logits.sum(0)


def grn_scale(x: torch.Tensor, gamma: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """GRN's per-sample channel scale ``1 + gamma * nx`` as ``(B, C, 1, 1)``, in one pass over a float32
    channels_last CPU map (no autograd); ``None`` where the kernel does not apply (then compute it in PyTorch).
    With a per-channel ``bias``: the scale of ``x + bias``, which the same pass writes over ``x`` (a 1x1's output
    and the bias left out of its GEMM)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _real(x, gamma) or x.dim() != 4:
        return None
    B, C, H, W = x.shape
    if (C % 8 or gamma.numel() != C or x.dtype != torch.float32 or gamma.dtype != torch.float32
            or x.device.type != "cpu" or gamma.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last)
            or (torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad))):
        return None
    if bias is not None and (bias.shape != (C,) or bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    g, bias = gamma.contiguous(), None if bias is None else bias.contiguous()
    out = x.new_empty(B, C, 1, 1)
    if B and lib.overlock_grn_scale_bias_avx2(_ptr(x), _ptr(bias), _ptr(g), _ptr(out), B, H * W, C) != 0:
        return None
    return out


def _grn_maps_ok(*maps: torch.Tensor) -> bool:
    """Float32 channels_last CPU maps of one shape with a multiple of 8 channels (the GRN kernels' layout)."""
    first = maps[0]
    return (first.dim() == 4 and first.shape[1] % 8 == 0
            and all(type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
                    and t.shape == first.shape and t.is_contiguous(memory_format=torch.channels_last) for t in maps))


def grn_sum_squares(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``x.square().sum((2, 3))`` as ``(B, C)`` in one read of a float32 channels_last CPU map (GRN's forward
    statistics; any autograd is the caller's); ``None`` where the kernel does not apply."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _grn_maps_ok(x):
        return None
    B, C, H, W = x.shape
    out = x.new_empty(B, C)
    if B and lib.overlock_grn_sumsq_avx2(_ptr(x), _ptr(out), B, H * W, C) != 0:
        return None
    return out


def grn_backward_sums(g: torch.Tensor, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``((g * x).sum((2, 3)), g.sum((2, 3)))``, both ``(B, C)``, in one read of the two maps (GRN's backward);
    ``None`` where the kernel does not apply (float32 channels_last CPU maps, channels a multiple of 8)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _grn_maps_ok(g, x):
        return None
    B, C, H, W = x.shape
    ds, gs = x.new_empty(B, C), x.new_empty(B, C)
    if B and lib.overlock_grn_backward_sums_avx2(_ptr(g), _ptr(x), _ptr(ds), _ptr(gs), B, H * W, C) != 0:
        return None
    return ds, gs


def grn_backward_apply(g: torch.Tensor, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                       beta: Optional[torch.Tensor] = None) -> bool:
    """In place, in one pass: ``g = g * s + x * t`` and, if ``beta`` is given, ``x = x * s + beta`` (``s``, ``t``
    per sample and channel, ``beta`` per channel). Returns ``False`` (nothing written) where the kernel does not
    apply (as :func:`grn_backward_sums`)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _grn_maps_ok(g, x):
        return False
    B, C, H, W = x.shape
    vecs = [s.reshape(B, C), t.reshape(B, C)] + ([] if beta is None else [beta.reshape(C)])
    if any(v.dtype != torch.float32 or v.device.type != "cpu" for v in vecs):
        return False
    vecs = [v.contiguous() for v in vecs]
    b = None if beta is None else vecs[2]
    return not B or lib.overlock_grn_backward_apply_avx2(_ptr(g), _ptr(x), _ptr(vecs[0]), _ptr(vecs[1]), _ptr(b),
                                                         B, H * W, C) == 0


def bn_batch_stats(y: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], eps: float
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """BatchNorm's batch statistics of a float32 channels_last CPU map (a multiple of 8 channels, 2 or more values
    per channel) in one read: ``(out, moments)``, ``out`` ``(4, C)`` float32 rows ``mean, invstd, a, b`` with ``a =
    gamma * invstd``, ``b = beta - mean * a`` (normalizing is ``y * a + b``), ``moments`` ``(2, C)`` float64 rows
    mean and unbiased variance (for :func:`bn_running_update`). Sums in float64 in a fixed order: the same bits for
    any thread count. ``None`` where the kernel does not apply."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _grn_maps_ok(y):
        return None
    B, C, H, W = y.shape
    params = [t for t in (gamma, beta) if t is not None]
    if any(t.shape != (C,) or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
           for t in params):
        return None
    out, moments = y.new_empty(4, C), torch.empty(2, C, dtype=torch.float64)
    if lib.overlock_bn_batch_stats_avx2(_ptr(y), B * H * W, C, _ptr(gamma), _ptr(beta), float(eps), _ptr(out),
                                        _ptr(moments)) != 0:
        return None
    return out, moments


def bn_running_update(running_mean: torch.Tensor, running_var: torch.Tensor, moments: torch.Tensor, factor: float
                      ) -> bool:
    """BatchNorm's running averages ``r = (1 - factor) * r + factor * batch`` in float64 from :func:`bn_batch_stats`'s
    ``moments``; ``False`` (nothing written) where the kernel does not apply (contiguous float32 CPU vectors)."""
    lib = _library() if _disabled == 0 else None
    C = moments.shape[1]
    if lib is None or any(t.shape != (C,) or t.dtype != torch.float32 or t.device.type != "cpu"
                          or not t.is_contiguous() or not _real(t) for t in (running_mean, running_var)):
        return False
    lib.overlock_bn_running_update(_ptr(running_mean), _ptr(running_var), _ptr(moments), C, float(factor))
    return True


def channel_affine_acc_(acc: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool
                        ) -> bool:
    """In one pass, ``acc = y * a + b`` or, with ``accumulate``, ``acc += y * a + b`` (``a``, ``b`` float32 per
    channel) on float32 channels_last CPU maps of one shape with a multiple of 8 channels. ``False`` (nothing
    written) where the kernel does not apply."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _grn_maps_ok(acc, y):
        return False
    C = y.shape[1]
    if any(v.shape != (C,) or v.dtype != torch.float32 or v.device.type != "cpu" or not v.is_contiguous()
           for v in (a, b)):
        return False
    return lib.overlock_channel_affine_acc_avx2(_ptr(acc), _ptr(y), _ptr(a), _ptr(b), y.numel() // C, C,
                                                int(accumulate)) == 0


def se_gate(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
            ) -> Optional[torch.Tensor]:
    """The squeeze-and-excitation gate ``sigmoid(w2 @ GELU(w1 @ mean_hw(x) + b1) + b2)`` as ``(B, C, 1, 1)``, one
    call over a float32 channels_last CPU map (exact GELU, no autograd); ``w1`` ``(R, C)``, ``w2`` ``(C, R)``.
    ``None`` where the kernel does not apply (then compute it in PyTorch)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or not _real(x, w1, b1, w2, b2) or x.dim() != 4:
        return None
    B, C, H, W = x.shape
    params = (w1, b1, w2, b2)
    if (C % 8 or C > 4096 or H * W == 0 or w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] > 4096
            or w2.shape != (C, w1.shape[0]) or b1.shape != (w1.shape[0],) or b2.shape != (C,)
            or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in params)
            or x.dtype != torch.float32 or x.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))):
        return None
    gate = x.new_empty(B, C, 1, 1)
    if B and lib.overlock_se_gate_avx2(x.data_ptr(), B, H * W, C, w1.data_ptr(), b1.data_ptr(), w1.shape[0],
                                       w2.data_ptr(), b2.data_ptr(), gate.data_ptr()) != 0:
        return None
    return gate


def _dense_alike(*tensors: torch.Tensor) -> bool:
    """Float32 CPU tensors of one shape whose elements fill their memory in the same order (any one dense memory
    format, as ``empty_like`` makes it), so an elementwise kernel can treat them as flat buffers."""
    first = tensors[0]
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device.type == "cpu"
               and t.shape == first.shape and t.stride() == first.stride() for t in tensors) \
        and (first.is_contiguous() or first.is_contiguous(memory_format=torch.channels_last))


def gelu(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Exact (erf) GELU of a dense float32 CPU tensor into ``out`` (default: a new tensor; ``out`` may be ``x``),
    no autograd; ``None`` where the kernel does not apply. Within 2e-7 of PyTorch's (``csrc/gelu_avx2.c``)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or x.dim() == 0:
        return None
    out = torch.empty_like(x) if out is None else out
    if not _dense_alike(x, out) or lib.overlock_gelu_avx2(_ptr(x), _ptr(out), x.numel()) != 0:
        return None
    return out


def bias_gelu_(x: torch.Tensor, bias: torch.Tensor) -> bool:
    """``x = GELU(x + bias)`` in place (exact GELU, the bits of :func:`gelu` of ``x + bias``) on a float32 CPU
    matrix ``(rows, cols)`` whose rows are dense (any row stride) and a dense ``(cols,)`` bias: a GEMM output and
    the bias it was computed without. ``False`` (nothing written) where the kernel does not apply."""
    lib = _library() if _disabled == 0 else None
    if (lib is None or x.dim() != 2 or x.dtype != torch.float32 or bias.dtype != torch.float32
            or x.device.type != "cpu" or bias.device.type != "cpu" or bias.shape != (x.shape[1],)
            or x.stride(1) != 1 or x.stride(0) < x.shape[1] or not bias.is_contiguous()):
        return False
    return lib.overlock_bias_gelu_avx2(_ptr(x), _ptr(bias), x.shape[0], x.shape[1], x.stride(0)) == 0


def gelu_backward(grad: torch.Tensor, x: torch.Tensor, out: Optional[torch.Tensor] = None
                  ) -> Optional[torch.Tensor]:
    """``grad * GELU'(x)`` (exact GELU) into ``out`` (default: a new tensor; may be ``grad`` or ``x``); ``None``
    where the kernel does not apply (as :func:`gelu`)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or x.dim() == 0:
        return None
    out = torch.empty_like(x) if out is None else out
    if not _dense_alike(grad, x, out) or lib.overlock_gelu_backward_avx2(_ptr(grad), _ptr(x), _ptr(out),
                                                                          x.numel()) != 0:
        return None
    return out


def silu_mul_(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """``a = SiLU(a) * b`` in place, one pass (no autograd: ``a`` must be a fresh buffer); with ``bias`` (per
    channel), ``a = SiLU(a + bias) * b`` on channels_last maps. ``False`` (nothing written) where the kernel does not
    apply (as :func:`gelu`: same shape and dense layout, float32 CPU; with a bias, 4-d channels_last maps with a
    multiple of 8 channels)."""
    lib = _library() if _disabled == 0 else None
    if lib is None or a.dim() == 0 or not _dense_alike(a, b):
        return False
    if bias is None:
        return lib.overlock_silu_mul_avx2(_ptr(a), _ptr(b), a.numel()) == 0
    if (a.dim() != 4 or a.shape[1] % 8 or not a.is_contiguous(memory_format=torch.channels_last)
            or bias.shape != (a.shape[1],) or bias.dtype != torch.float32 or bias.device.type != "cpu"
            or not bias.is_contiguous()):
        return False
    C = a.shape[1]
    return lib.overlock_bias_silu_mul_avx2(_ptr(a), _ptr(bias), _ptr(b), a.numel() // C, C) == 0


def context_concat(x: torch.Tensor, ctx: torch.Tensor, prior: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   bias: torch.Tensor) -> Optional[torch.Tensor]:
    """``torch.cat([x, bias + ctx * w1 + prior * w2], dim=1)`` in one pass (the bits of PyTorch's addcmul twice,
    then the concatenation): the Focus-Net block's input at inference. Float32 channels_last CPU maps of one batch
    and size (``x``, ``ctx`` may be channel slices of one map), per-channel ``w1``, ``w2``, ``bias`` of ``ctx``'s
    channels, multiples of 8 channels, no autograd; ``None`` where it does not apply."""
    lib = _library() if _disabled == 0 else None
    vectors = (w1, w2, bias)
    if lib is None or not _real(x, ctx, prior, *vectors) or x.dim() != 4 or ctx.dim() != 4:
        return None
    B, Cx, H, W = x.shape
    Cc = ctx.shape[1]
    maps = (x, ctx, prior)
    if (Cx % 8 or Cc % 8 or ctx.shape != (B, Cc, H, W) or prior.shape != ctx.shape
            or any(t.numel() != Cc for t in vectors)
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (*maps, *vectors))
            or any(t.stride(1) != 1 or t.stride(2) != W * t.stride(3) or t.stride(0) != H * W * t.stride(3)
                   for t in maps)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (*maps, *vectors)))):
        return None
    w1, w2, bias = (t.contiguous() for t in vectors)
    out = torch.empty(B, Cx + Cc, H, W, dtype=x.dtype, memory_format=torch.channels_last)
    if lib.overlock_context_concat_avx2(x.data_ptr(), x.stride(3), Cx, ctx.data_ptr(), ctx.stride(3),
                                        prior.data_ptr(), prior.stride(3), Cc, w1.data_ptr(), w2.data_ptr(),
                                        bias.data_ptr(), out.data_ptr(), B * H * W) != 0:
        return None
    return out
