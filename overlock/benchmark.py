"""Throughput, latency and peak memory of OverLoCK and timm models, measured the same way side by side.

Each measurement runs in a fresh Python process (``python -m overlock.benchmark --worker CONFIG``) so that
peak memory is that of one configuration alone and allocator state or threads do not leak between runs.
Peak memory is the resident-set high-water mark (``VmHWM``) on CPU, reset after the model and inputs are
built, so ``peak_mb`` is what running the model adds; on CUDA it is ``torch.cuda.max_memory_allocated``.

Denormal floats are flushed to zero by default (``flush_denormal``): freshly initialised OverLoCK models
(small layer scales, zero-initialised GRN) produce denormal activations deep in the network, which make x86
CPUs 10-50x slower on the affected operators, and a benchmark of random weights would measure that artefact
rather than the model. Every configuration, the official method included, runs under the same setting.

With ``official_code_twin(cfg, repo)`` the official implementation itself is measured, imported from a checkout
of LMMMEng/OverLoCK (see :mod:`overlock.official_code`).

The *official method* configuration (``official_method(cfg)``) is our exact model run the way the official
code runs without natten: ContMix on the ``unfold`` backend, NCHW memory format, training form (no
re-parameterization). It gives the speed-up over the official implementation inside the project.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

__all__ = ["BenchConfig", "official_method", "official_code_twin", "measure", "measure_in_subprocess", "environment",
           "MODES"]

MODES = ("infer", "train")
AUX_WEIGHT = 0.4  # deep-supervision loss weight of the official training recipe


@dataclasses.dataclass
class BenchConfig:
    """One measurement: a model in one form, on one input shape, in one mode."""
    model: str
    mode: str = "infer"  # "infer" (eval, inference_mode) or "train" (forward, backward, AdamW step)
    batch_size: int = 16
    img_size: int = 224
    channels_last: bool = True
    reparam: bool = True  # deploy form for inference (ignored in training)
    backend: Optional[str] = None  # ContMix backend for OverLoCK models (None: library default)
    amp: bool = False
    amp_dtype: str = "bfloat16"
    model_dtype: str = "float32"
    compile: bool = False
    warmup: int = 2
    repeats: int = 5
    threads: Optional[int] = None
    device: str = "cpu"
    label: str = ""
    num_classes: int = 1000
    flush_denormal: bool = True  # randomly initialised models produce denormals that slow CPUs down ~40x
    official_code: Optional[str] = None  # a checkout of LMMMEng/OverLoCK: measure its own model instead of ours
    baseline: bool = False  # a row that the preceding row of ours is compared with (speed-up, memory ratio)
    runtime: str = "torch"  # "onnxruntime": the deploy form exported to ONNX, run by onnxruntime (CPU inference)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.label:
            self.label = self.describe()

    def describe(self) -> str:
        parts = [self.model, self.mode, f"b{self.batch_size}", f"{self.img_size}px",
                 "channels_last" if self.channels_last else "nchw"]
        if self.mode == "infer" and self.reparam and is_overlock(self.model):
            parts.append("deploy")
        if self.backend and is_overlock(self.model):
            parts.append(self.backend)
        if self.amp:
            parts.append(f"amp-{self.amp_dtype}")
        if self.model_dtype != "float32":
            parts.append(self.model_dtype)
        if self.compile:
            parts.append("compiled")
        if self.runtime != "torch":
            parts.append(self.runtime)
        return " ".join(parts)


def is_overlock(name: str) -> bool:
    return "overlock" in name.split(".")[0]


def official_method(cfg: BenchConfig) -> BenchConfig:
    """The same measurement run the way the official code runs without natten (see module docstring)."""
    fields = dataclasses.asdict(cfg)
    fields.update(backend="unfold", channels_last=False, reparam=False, compile=False, label="")
    out = BenchConfig(**fields)
    out.label = f"{out.model} {out.mode} b{out.batch_size} {out.img_size}px official method (unfold, nchw, " \
                f"training form)"
    out.baseline = True
    return out


def official_code_twin(cfg: BenchConfig, repo: str) -> BenchConfig:
    """The same measurement of the official implementation itself, run as it runs (NCHW, training form)."""
    fields = dataclasses.asdict(cfg)
    fields.update(backend=None, channels_last=False, reparam=False, compile=False, label="", official_code=repo,
                  baseline=True)
    out = BenchConfig(**fields)
    out.label = f"{out.model} {out.mode} b{out.batch_size} {out.img_size}px official code (LMMMEng/OverLoCK, " \
                f"natten-free unfold, nchw)"
    return out


# ------------------------------------------------------------------------------------------------------- memory

def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------- worker

def _build(cfg: BenchConfig):
    import timm
    import torch

    import overlock  # noqa: F401  (registers the models)

    kwargs = dict(num_classes=cfg.num_classes)
    if cfg.mode == "train" and is_overlock(cfg.model):
        kwargs["use_ds"] = True
    if cfg.official_code:
        from .official_code import build_official_model
        model = build_official_model(cfg.official_code, cfg.model, **kwargs)
    else:
        model = timm.create_model(cfg.model, **kwargs)
    if cfg.mode == "infer":
        model.eval()
        if cfg.reparam and not cfg.official_code:
            from timm.utils import reparameterize_model
            model = reparameterize_model(model)
    else:
        model.train()
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.model_dtype)
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return model, x


def _step_fn(cfg: BenchConfig, model, x):
    """A closure running one inference batch or one training step."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from .training.optim import fused_kwargs

    autocast = (lambda: torch.autocast(x.device.type, dtype=getattr(torch, cfg.amp_dtype))) if cfg.amp \
        else contextlib.nullcontext
    if cfg.mode == "infer":
        def step():
            with torch.inference_mode(), autocast():
                return model(x)
        return step
    target = torch.randint(0, cfg.num_classes, (x.shape[0],), device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused_kwargs(model.parameters()))
    with_aux = is_overlock(cfg.model)

    def step():
        with autocast():
            if with_aux and cfg.official_code:  # the official forward returns dict(main=..., aux=...)
                out = model(x)
                loss = F.cross_entropy(out["main"], target) + AUX_WEIGHT * F.cross_entropy(out["aux"], target)
            elif with_aux:
                logits, aux = model(x, return_aux=True)
                loss = F.cross_entropy(logits, target) + AUX_WEIGHT * F.cross_entropy(aux, target)
            else:
                loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def measure(cfg: BenchConfig) -> Dict:
    """Run one configuration in this process and return its figures (see ``BenchConfig``)."""
    import torch

    import overlock

    if cfg.runtime == "onnxruntime":
        from .export import measure_onnxruntime
        return measure_onnxruntime(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)
    backend_ctx = overlock.use_backend(cfg.backend) if cfg.backend else _null()
    cuda = cfg.device.startswith("cuda")
    with backend_ctx:
        model, x = _build(cfg)
        step = _step_fn(cfg, model, x)

        def sync():
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        base_rss = _rss_kb("VmRSS")
        peak_resettable = _reset_peak_rss()
        t0 = time.perf_counter()
        for _ in range(max(cfg.warmup, 1)):
            step()
        sync()
        warmup_s = time.perf_counter() - t0
        times = []
        for _ in range(cfg.repeats):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
    median = statistics.median(times)
    result = dict(dataclasses.asdict(cfg))
    result.update(
        backend_used=cfg.backend or overlock.get_backend(),
        latency_ms=median * 1e3,
        latency_min_ms=min(times) * 1e3,
        latency_max_ms=max(times) * 1e3,
        img_per_s=cfg.batch_size / median,
        ms_per_img=median * 1e3 / cfg.batch_size,
        times_ms=[t * 1e3 for t in times],
        warmup_s=warmup_s,
        threads=torch.get_num_threads(),
    )
    if cuda:
        result.update(peak_mb=(torch.cuda.max_memory_allocated() - base) / 2 ** 20,
                      peak_total_mb=torch.cuda.max_memory_allocated() / 2 ** 20, memory_kind="cuda_allocated")
    else:
        hwm = _rss_kb("VmHWM")
        result.update(peak_total_mb=hwm / 1024, base_mb=base_rss / 1024,
                      peak_mb=(hwm - base_rss) / 1024 if peak_resettable else None, memory_kind="cpu_rss_hwm")
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure_in_subprocess(cfg: BenchConfig, timeout: Optional[float] = None) -> Dict:
    """``measure`` in a fresh interpreter (clean peak memory); errors come back as ``{"error": ...}``."""
    cmd = [sys.executable, "-m", "overlock.benchmark", "--worker", json.dumps(dataclasses.asdict(cfg))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(dataclasses.asdict(cfg), error=f"timed out after {timeout} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return dict(dataclasses.asdict(cfg), error="\n".join(tail) or f"worker exited with {proc.returncode}")


def _native_kernels() -> str:
    """Whether the hand-written CPU kernels ran (and on which ISAs the model uses them), or why not."""
    from .ops import native
    return native.describe()


def _cpu_isa() -> str:
    """The vector ISA PyTorch's CPU kernels use here (``AVX512``, ``AVX2``, ...): timings differ between them."""
    from .ops import native
    return native.cpu_isa()


ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment() -> Dict:
    """Machine and versions, recorded with every result file."""
    import timm
    import torch

    import overlock

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    env = dict(
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), platform=platform.platform(),
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
        overlock=overlock.__version__, mkldnn=torch.backends.mkldnn.is_available(),
        cpu_isa=_cpu_isa(), native_kernels=_native_kernels(),
    )
    # ISA caps hold the kernels to an older instruction set than the CPU has (e.g. AVX2 code paths measured on an
    # AVX-512 machine): record them, since cpu_isa then names the emulated ISA
    caps = {k: os.environ[k] for k in ISA_CAP_VARS if os.environ.get(k)}
    if caps:
        env["isa_caps"] = caps
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def _worker(argv: List[str]) -> int:
    cfg = BenchConfig(**json.loads(argv[argv.index("--worker") + 1]))
    print(json.dumps(measure(cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv))
