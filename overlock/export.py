"""Export of OverLoCK classifiers (and UperNet segmenters) in their fused inference form to ONNX and
``torch.export``, verified on export.

The model is loaded from a checkpoint (official or project, training or deploy form), put in eval mode and
fused with ``timm.utils.reparameterize_model`` (the deploy form), then traced with ``torch.export``; ONNX goes
through ``torch.onnx.export(dynamo=True)``. Every export is run again on fresh inputs (onnxruntime for ONNX,
the loaded ``ExportedProgram`` for torch.export) and compared with the PyTorch model on the project's default
(fast) ContMix backend; a relative error above ``tolerance`` (1e-4) fails the export.

Backend. The default ``tiled`` neighbourhood aggregation does not export with a dynamic batch: its inference path
(``overlock/ops/neighborhood.py``, ``_single_tile_chunked``) loops in Python over chunks of ``batch x heads``
(a chunk count that depends on the batch size, so ``torch.export`` specialises the batch to the example's), and
its index plans are built from the map size as Python integers. The export therefore traces the ``unfold``
backend (the official natten-free method: ``F.unfold``, replicate padding, one einsum), the same function with
only shape-generic tensor operations.

Fused blocks. ``FusedRepConvBlock`` (the fuse step, ``overlock/fused.py``) runs large batches in chunks, except
while a graph is exported or compiled: the exported graph handles any batch in one pass.

Input sizes. An exported file accepts any batch size (1 to 1024) but only the height and width it was
exported at (``--img-size``; the verification also runs a second batch size). Height and width cannot be
dynamic with the model code as it is: (1) below ``min_unresized_side`` (224 for the official configurations:
stride-16 maps need 13 pixels, stride-32 maps 7) ContMix resizes small maps up and pools them back at sizes
computed in Python from the map size (the official small-map path); (2) at any size, ``depthwise_conv``
(``overlock/layers.py``) crops its kernel with ``int(x.shape[-2])`` (a deliberate specialisation for
``torch.compile``), ``rpb_index`` (``overlock/ops/neighborhood.py``) caches position-bias index tables in a
dict keyed by the map size, which a symbolic size cannot be, and the fused ``pointwise_scaled``
(``overlock/fused.py``) chooses between two equal computations by ``H * W < out_channels``. Export at the size
you will run at.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .weights import CheckpointError

__all__ = ["ExportError", "ExportResult", "load_classifier", "min_unresized_side", "trace", "save_onnx", "save_torch",
           "export_checkpoint", "verify_onnx", "verify_torch_export", "FORMATS", "EXPORT_BACKEND"]

FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
EXPORT_BACKEND = "unfold"
MAX_BATCH = 1024


class ExportError(RuntimeError):
    """An export that cannot be made or does not reproduce the PyTorch model; the message says why."""


@dataclass
class ExportResult:
    path: str
    format: str
    model: str
    input_size: Tuple[int, int]
    accepts: str
    checks: List[Dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_rel_err(self) -> float:
        return max(c["rel_err"] for c in self.checks)

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, {os.path.getsize(self.path) / 1e6:.1f} MB, {self.model}, "
                 f"deploy form, exported in {self.seconds:.0f} s)",
                 f"accepts: {self.accepts}"]
        for c in self.checks:
            lines.append(f"verified against PyTorch: input {'x'.join(map(str, c['shape']))}: relative error "
                         f"{c['rel_err']:.2e}")
        return "\n".join(lines)


def min_unresized_side(model: torch.nn.Module) -> int:
    """Smallest image side at which no ContMix map is resized (the size-dependent small-map path is skipped)."""
    need = 0
    for name, module in model.named_modules():
        k = getattr(module, "kernel_size", None)
        if isinstance(k, int) and hasattr(module, "smk_size"):  # a ContMix mixer
            stride = 16 if name.startswith("sub_blocks3") else 32
            need = max(need, stride * k)
    return max(need, 32)


def load_classifier(checkpoint: str, ema: Optional[bool] = None):
    """The classifier of ``checkpoint`` in eval mode and fused deploy form, and what ``inspect`` found."""
    import timm

    from .inspection import inspect_checkpoint, variant_config
    from .weights import load_into
    info = inspect_checkpoint(checkpoint, ema=ema)
    if info.task == "segmentation":  # UperNet: logits (N, classes, H, W) at the input size
        from .segmentation.model import model_from_checkpoint
        return timm.utils.reparameterize_model(model_from_checkpoint(str(checkpoint)).eval()), info
    if info.task != "classification":
        raise ExportError(f"{checkpoint}: a {info.task} checkpoint; `overlock export` handles classifiers and "
                          f"UperNet segmenters ({info.task} export is a planned follow-up)")
    if not info.exact:
        raise CheckpointError(f"{checkpoint}: does not fit {info.variant} (missing {info.missing[:5]}, unexpected "
                              f"{info.unexpected[:5]}, mismatched {info.mismatched[:5]}); see `overlock inspect`")
    from .models import OverLoCK
    model = OverLoCK(num_classes=info.num_classes or 0, deploy=info.form == "deploy", **variant_config(info.variant))
    state_source = checkpoint
    if ema is not None or info.has_ema:
        from .inspection import load_checked
        _, _, state, _, _, _ = load_checked(checkpoint, ema)
        state_source = state
    load_into(model, state_source, source=str(checkpoint))
    model = timm.utils.reparameterize_model(model.eval())
    return model, info


def _inputs_for_check(height: int, width: int, batch: int, seed: int = 0) -> List[torch.Tensor]:
    """Fresh inputs (not the tracing example) at the export batch size and at another one."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(n, 3, height, width, generator=g) for n in (batch, 1 if batch > 1 else 3)]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _plan(model: torch.nn.Module, height: int, width: int) -> str:
    side = min_unresized_side(model)
    why = (f"below {side} px ContMix resizes small maps at sizes computed from the input size"
           if min(height, width) < side else "the kernel crops and position-bias tables are size-specialised")
    return (f"input float32 NCHW (N, 3, {height}, {width}), ImageNet-normalised: any batch size N from 1 to "
            f"{MAX_BATCH}; height and width fixed at {height}x{width} ({why}; export again for another size)")


def _dynamic_shapes():
    from torch.export import Dim
    return {"x": {0: Dim("batch", min=1, max=MAX_BATCH)}}


def trace(model: torch.nn.Module, height: int = 224, width: int = 224, batch: int = 2):
    """``torch.export`` of ``model`` (already fused) on the exporting backend, with a dynamic batch dimension."""
    from . import use_backend
    batch = max(batch, 2)  # torch.export specialises dimensions of size 1: an example batch of 1 would fix it
    example = torch.randn(batch, 3, height, width)
    with use_backend(EXPORT_BACKEND), torch.no_grad():
        try:
            return torch.export.export(model, (example,), dynamic_shapes=_dynamic_shapes(), strict=False)
        except Exception as e:  # noqa: BLE001 - re-raised with what it is about
            raise ExportError(f"torch.export failed ({EXPORT_BACKEND} backend, input {batch}x3x{height}x{width}): "
                              f"{type(e).__name__}: {e}") from e


def save_torch(program, path: str) -> None:
    """The ExportedProgram as a ``.pt2`` file (``torch.export.load(path).module()`` runs it)."""
    torch.export.save(program, path)


def save_onnx(program, path: str, opset: int = 18) -> None:
    """ONNX (opset >= 17) of an ExportedProgram through torch's dynamo exporter; one self-contained file."""
    if opset < 17:
        raise ValueError(f"--opset must be 17 or newer, got {opset}")
    try:
        import onnxscript  # noqa: F401 - needed by torch's ONNX exporter
    except ImportError as e:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'overlock[export]'") from e
    try:
        # the exporter prints progress and optimizer notes on stdout; keep the command's output to the result
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, input_names=["input"], output_names=["logits"], dynamo=True,
                                             opset_version=opset, external_data=False, verbose=False)
            onnx_program.save(path, external_data=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {e}") from e


def verify_onnx(path: str, model: torch.nn.Module, inputs: Sequence[torch.Tensor], tolerance: float = 1e-4):
    """onnxruntime (CPU) outputs against the PyTorch model (default backend) for each input."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("verifying ONNX needs onnxruntime: pip install 'overlock[export]'") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no constant-folding notes
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    checks = []
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        checks.append({"shape": list(x.shape), "rel_err": _rel_err(out, ref)})
    _check(checks, tolerance, path)
    return checks


def verify_torch_export(path: str, model: torch.nn.Module, inputs: Sequence[torch.Tensor],
                        tolerance: float = 1e-4):
    """The saved ExportedProgram, loaded back, against the PyTorch model (default backend)."""
    program = torch.export.load(path).module()
    checks = []
    for x in inputs:
        with torch.no_grad():
            ref = model(x)
            out = program(x)
        checks.append({"shape": list(x.shape), "rel_err": _rel_err(out, ref)})
    _check(checks, tolerance, path)
    return checks


def _check(checks, tolerance, path):
    bad = [c for c in checks if not c["rel_err"] <= tolerance]
    if bad:
        raise ExportError(f"{path}: the exported model differs from PyTorch: " + ", ".join(
            f"input {'x'.join(map(str, c['shape']))}: relative error {c['rel_err']:.2e}" for c in bad)
            + f" (tolerance {tolerance:g}); the file is kept for inspection")


def export_checkpoint(checkpoint: str, output: str, fmt="onnx", img_size: Tuple[int, int] = (224, 224),
                      batch: int = 2, opset: int = 18, ema: Optional[bool] = None,
                      tolerance: float = 1e-4, seed: int = 0) -> List[ExportResult]:
    """Load, fuse, trace once, write each format in ``fmt`` (a name or a list) and verify each file.

    ``output`` is the file for a single format, or a path without suffix (``.onnx``/``.pt2`` added) for several.
    See the module docstring for the input sizes an exported file accepts.
    """
    formats = [fmt] if isinstance(fmt, str) else list(dict.fromkeys(fmt))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--format must be among {', '.join(FORMATS)}, got {', '.join(bad) or 'nothing'}")
    if "onnx" in formats and opset < 17:
        raise ValueError(f"--opset must be 17 or newer, got {opset}")
    height, width = img_size
    model, info = load_classifier(checkpoint, ema)
    accepts = _plan(model, height, width)
    name = info.variant + ("" if info.variant == "test_overlock" else "_reparam")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    start = time.perf_counter()
    program = trace(model, height, width, batch)
    traced = time.perf_counter() - start
    inputs = _inputs_for_check(height, width, batch, seed)
    results = []
    for f in formats:
        path = output if len(formats) == 1 else output + SUFFIX[f]
        start = time.perf_counter()
        if f == "onnx":
            save_onnx(program, path, opset)
        else:
            save_torch(program, path)
        seconds = traced + time.perf_counter() - start
        checks = (verify_onnx if f == "onnx" else verify_torch_export)(path, model, inputs, tolerance)
        results.append(ExportResult(path, f, name, (height, width), accepts, checks, seconds))
        with open(path + ".json", "w") as fh:  # what the file accepts, next to it
            json.dump({"format": f, "model": name, "num_classes": info.num_classes, "input_size": [height, width],
                       "dynamic": {"batch": [1, MAX_BATCH], "height": False, "width": False}, "accepts": accepts,
                       "checks": checks, "opset": opset if f == "onnx" else None, "contmix_backend": EXPORT_BACKEND,
                       "source_checkpoint": os.path.basename(str(checkpoint))}, fh, indent=2)
    return results


def measure_onnxruntime(cfg) -> Dict:
    """Latency of ``cfg.model`` (deploy form, random weights) in onnxruntime on the CPU, for ``overlock benchmark
    --onnxruntime``: exported here at the configuration's batch and size, then timed like the PyTorch rows
    (warm-up runs, then the median of ``repeats``). Export time is not counted."""
    import statistics
    import tempfile

    import numpy as np
    import timm

    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("onnxruntime rows need the export extra: pip install 'overlock[export]'") from e
    if cfg.mode != "infer" or not cfg.device.startswith("cpu"):
        raise ExportError("onnxruntime is measured for CPU inference only")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)
    model = timm.create_model(cfg.model, num_classes=cfg.num_classes).eval()
    model = timm.utils.reparameterize_model(model)
    start = time.perf_counter()
    program = trace(model, cfg.img_size, cfg.img_size, cfg.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        save_onnx(program, path)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = cfg.threads or torch.get_num_threads()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((cfg.batch_size, 3, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
    t0 = time.perf_counter()
    for _ in range(max(cfg.warmup, 1)):
        out = session.run(None, {"input": x})[0]
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    import dataclasses
    result = dict(dataclasses.asdict(cfg))
    result.update(backend_used=f"onnxruntime {ort.__version__} (exported with {EXPORT_BACKEND})",
                  latency_ms=median * 1e3, latency_min_ms=min(times) * 1e3, latency_max_ms=max(times) * 1e3,
                  img_per_s=cfg.batch_size / median, ms_per_img=median * 1e3 / cfg.batch_size,
                  times_ms=[t * 1e3 for t in times], warmup_s=warmup_s, export_s=export_s,
                  threads=options.intra_op_num_threads, peak_mb=None, memory_kind=None,
                  rel_err_vs_pytorch=_rel_err(torch.from_numpy(out), ref))
    return result
