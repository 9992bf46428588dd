"""Issue #12, GPU part: is the GPU path exact, where does an overlock_t training step's time go, and does ContMix's
aggregation matter there? One script for one short device run (`benchmarks/gpu_run.sh`); prints a summary last.

1. Exactness on the GPU: fp32 (TF32 off) eval logits against the CPU's; training gradients of the tiled aggregation
   against the official method's unfold, both on the GPU.
2. Training step (bf16 autocast, channels_last, AdamW): CUDA-event median; the same step with the neighbourhood
   aggregation replaced by a trivial stand-in of the same shapes ("leave one stage out": the difference is what
   the aggregation costs, forward and backward); a per-op profile of one step.
   Also the step with the CPU's cache-sized chunks of the one-tile aggregation (as the GPU ran it before).
3. Inference without autocast: the batched ContMix path against the per-sample one (a CPU cache trick).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import overlock
from overlock import contmix


DEVICE = "cuda"
REPEATS = 10


def events_ms(fn, warmup=3, repeats=None):
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU, the wall clock elsewhere."""
    for _ in range(warmup if DEVICE == "cuda" else 1):
        fn()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(repeats or REPEATS):
        if DEVICE == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            sync()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def exactness(report):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = timm.create_model("overlock_t", num_classes=1000, use_ds=True).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        out = model.to(DEVICE)(x.to(DEVICE)).cpu()
    report["eval_logits_gpu_vs_cpu_rel"] = rel(out, ref)
    model.train()
    grads = {}
    for backend in ("tiled", "unfold"):
        model.zero_grad(set_to_none=True)
        with overlock.use_backend(backend):
            torch.manual_seed(1)
            logits, aux = model(x.to(DEVICE), return_aux=True)
            (logits.square().mean() + aux.square().mean()).backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    report["train_grads_tiled_vs_unfold_rel"] = rel(grads["tiled"], grads["unfold"])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def train_step_fn(model, x, target):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            logits, aux = model(x, return_aux=True)
            loss = F.cross_entropy(logits, target) + 0.4 * F.cross_entropy(aux, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def stand_in_av(attn, value, kernel_size, backend="tiled"):
    """Same shapes and autograd reach as the aggregation, no neighbourhood work (one pointwise product)."""
    return value * attn[..., :1].to(value.dtype)


def training(report, batch, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, use_ds=True).to(DEVICE).train()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=DEVICE)
    step = train_step_fn(model, x, target)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report[f"{name}_train_b{batch}_ms"] = events_ms(step)
    if DEVICE == "cuda":
        report[f"{name}_train_b{batch}_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    original = contmix.na2d_av
    contmix.na2d_av = stand_in_av
    try:
        report[f"{name}_train_b{batch}_no_aggregation_ms"] = events_ms(step)
    finally:
        contmix.na2d_av = original
    report[f"{name}_train_b{batch}_again_ms"] = events_ms(step)
    from overlock.ops import neighborhood
    chunk = neighborhood.DEVICE_CHUNK_BYTES
    neighborhood.DEVICE_CHUNK_BYTES = neighborhood.DENSE_CHUNK_BYTES  # the CPU's cache-sized chunks, as before
    try:
        report[f"{name}_train_b{batch}_cpu_chunks_ms"] = events_ms(step)
    finally:
        neighborhood.DEVICE_CHUNK_BYTES = chunk
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        try:
            return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return "profile table unavailable"


def inference(report, batch, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).to(DEVICE).eval().to(memory_format=torch.channels_last)
    from timm.utils import reparameterize_model
    model = reparameterize_model(model)
    x = torch.randn(batch, 3, 224, 224, device=DEVICE).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return model(x)
    report[f"{name}_infer_fp32_b{batch}_batched_path_ms"] = events_ms(run, 2, 5)
    original = contmix._per_sample_ok
    contmix._per_sample_ok = lambda *t: True  # the per-sample loop, as the GPU ran it before
    try:
        report[f"{name}_infer_fp32_b{batch}_per_sample_path_ms"] = events_ms(run, 2, 5)
    finally:
        contmix._per_sample_ok = original


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--profile")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script out (fp32, one warm-up)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    global DEVICE, REPEATS
    DEVICE, REPEATS = args.device, args.repeats
    report = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__,
                  timm=timm.__version__)
    exactness(report)
    print(json.dumps(report), flush=True)
    table = training(report, args.batch, "overlock_t")
    print(json.dumps(report), flush=True)
    inference(report, args.batch, "overlock_t")
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(table)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    for k, v in report.items():
        print(f"{k:50s} {v:.6g}" if isinstance(v, float) else f"{k:50s} {v}")


if __name__ == "__main__":
    main()
