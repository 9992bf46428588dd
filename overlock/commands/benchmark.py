"""``overlock benchmark``: throughput, latency and peak memory, side by side with any timm model.

Example: ``overlock benchmark --model overlock_t --compare convnext_tiny --official --mode infer train``.
The measuring logic lives in :mod:`overlock.benchmark`; this module only maps flags onto it and prints.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError
from .argtypes import non_negative_int, positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", nargs="+", default=["overlock_t"], help="models to measure (ours or any timm name)")
    p.add_argument("--compare", nargs="*", default=[], help="further models measured in the same run, "
                   "e.g. convnext_tiny")
    p.add_argument("--mode", nargs="+", choices=["infer", "train"], default=["infer"],
                   help="inference (eval, inference_mode) and/or training step (forward, backward with the "
                        "auxiliary loss for OverLoCK, AdamW step)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=16)
    p.add_argument("--img-size", type=positive_int, nargs="+", default=[224], help="one or more input sides")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default on)")
    p.add_argument("--reparam", action=argparse.BooleanOptionalAction, default=True,
                   help="deploy (re-parameterized) form for inference (default on)")
    p.add_argument("--backend", default=None, choices=["tiled", "unfold", "naive"],
                   help="ContMix aggregation backend (default: the library's, tiled; unfold is the official method)")
    p.add_argument("--official", action="store_true",
                   help="also measure each OverLoCK configuration the official way (unfold backend, NCHW, "
                        "training form) and report the speed-up")
    p.add_argument("--official-code", metavar="DIR", default=None,
                   help="also measure the official implementation itself, imported from DIR, a checkout of "
                        "github.com/LMMMEng/OverLoCK (natten replaced by its own natten-free fallback)")
    p.add_argument("--amp", action="store_true", help="autocast mixed precision")
    p.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="cast model and input (inference)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed iterations; the median is reported (default 5)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads in each measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--keep-denormals", action="store_true",
                   help="do not flush denormal floats to zero (random-init models then run far slower on CPU)")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--onnxruntime", action="store_true",
                   help="add a row per OverLoCK CPU inference run: the deploy form exported to ONNX and run by "
                   "onnxruntime (needs the export extra; export time not counted)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (faster start; peak memory then includes earlier runs)")
    p.add_argument("--timeout", type=positive_float, default=None, help="seconds allowed per measurement")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="measure every configuration this many times, alternating between them, and report the "
                        "median round and each ratio's median and range (for machines whose speed drifts)")
    p.add_argument("--json", metavar="PATH", default=None, help="write machine, versions, command and results")


def configs(args: argparse.Namespace):
    """All measurements the flags ask for, in order: each model, then its official twins (method, code)."""
    from overlock.benchmark import BenchConfig, is_overlock, official_code_twin, official_method

    out = []
    for img_size in args.img_size:
        for mode in args.mode:
            for name in list(args.model) + list(args.compare):
                cfg = BenchConfig(
                    model=name, mode=mode, batch_size=args.batch_size, img_size=img_size,
                    channels_last=args.channels_last, reparam=args.reparam, backend=args.backend, amp=args.amp,
                    amp_dtype=args.amp_dtype, model_dtype=args.model_dtype, compile=args.compile,
                    warmup=args.warmup, repeats=args.repeats, threads=args.threads, device=args.device,
                    num_classes=args.num_classes, flush_denormal=not args.keep_denormals)
                out.append(cfg)
                if getattr(args, "onnxruntime", False) and is_overlock(name) and mode == "infer":
                    import dataclasses
                    out.append(dataclasses.replace(cfg, runtime="onnxruntime", channels_last=False, label=""))
                if args.official and is_overlock(name):
                    out.append(official_method(cfg))
                if args.official_code and is_overlock(name):
                    out.append(official_code_twin(cfg, args.official_code))
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _compare_with(results: list, cfgs: list, compare: list) -> None:
    """Ratios within one round: each official twin (a baseline row) against the OverLoCK row before it, each
    ``--compare`` model against the first ``--model`` row of the same mode and size. Set on both rows:
    ``speedup_of_ours`` / ``memory_of_ours`` on the compared row, ``speedup_vs_<what>`` / ``memory_vs_<what>`` on ours.
    """
    ours, first = None, {}
    for cfg, r in zip(cfgs, results):
        key = (cfg.mode, cfg.img_size)
        is_compare = cfg.model in compare and not cfg.baseline
        if "error" in r:
            ours = None if not cfg.baseline else ours
            continue
        if cfg.baseline:
            ref, name = ours, "official_code" if cfg.official_code else "official"
        elif is_compare:
            ref, name = first.get(key), cfg.model
        else:
            ours = r
            first.setdefault(key, r)
            continue
        if ref is None:
            continue
        r["speedup_of_ours"] = ref["img_per_s"] / r["img_per_s"]
        ref[f"speedup_vs_{name}"] = r["speedup_of_ours"]
        if r.get("peak_mb") and ref.get("peak_mb") is not None:
            r["memory_of_ours"] = ref["peak_mb"] / r["peak_mb"]
            ref[f"memory_vs_{name}"] = r["memory_of_ours"]


RATIO_PREFIXES = ("speedup_of_ours", "memory_of_ours", "speedup_vs_", "memory_vs_")


def _median_round(rounds: list) -> dict:
    """One configuration over several rounds: the round with the median throughput, each ratio replaced by its
    median over the rounds (with ``<ratio>_range``: lowest and highest), every round's throughput and best
    latency listed."""
    import statistics

    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    out = dict(sorted(ok, key=lambda r: r["img_per_s"])[len(ok) // 2])
    out["rounds_img_per_s"] = [r["img_per_s"] for r in ok]
    out["rounds_latency_min_ms"] = [r["latency_min_ms"] for r in ok if "latency_min_ms" in r]
    out["rounds_failed"] = len(rounds) - len(ok)
    for key in {k for r in ok for k in r if k.startswith(RATIO_PREFIXES) and not k.endswith("_range")}:
        values = [r[key] for r in ok if key in r]
        out[key], out[f"{key}_range"] = statistics.median(values), [min(values), max(values)]
    return out


def _row(r: dict) -> str:
    if "error" in r:
        return f"| {r['label']} | error: {r['error'].splitlines()[-1]} |||||"
    vs = ""
    if "speedup_of_ours" in r:
        vs = f"{r['speedup_of_ours']:.2f}x"
        if "speedup_of_ours_range" in r:
            lo, hi = r["speedup_of_ours_range"]
            vs += f" ({lo:.2f}-{hi:.2f})"
    return (f"| {r['label']} | {r['img_per_s']:.2f} | {r['latency_ms']:.1f} | {r['ms_per_img']:.1f} | "
            f"{_fmt(r.get('peak_mb'), '.0f')} | {vs} |")


HEADER = "| run | img/s | latency ms | ms/img | peak MB | our speed-up over this row |\n|---|---|---|---|---|---|"


def run(args: argparse.Namespace) -> int:
    from overlock.benchmark import environment, measure, measure_in_subprocess

    if args.official_code:  # a wrong folder fails before any measurement
        from overlock.official_code import official_overlock_file
        try:
            official_overlock_file(args.official_code)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    env = environment()
    caps = f", capped by {' '.join(f'{k}={v}' for k, v in env['isa_caps'].items())}" if env.get("isa_caps") else ""
    print(f"# {env['cpu']} ({env['cpu_count']} cpus, {env['cpu_isa']}{caps}), torch {env['torch']}, timm {env['timm']}",
          flush=True)
    cfgs = configs(args)
    rounds = getattr(args, "rounds", 1)
    per_round = []
    for i in range(rounds):
        if rounds > 1:
            print(f"\nround {i + 1} of {rounds}")
        print(HEADER, flush=True)
        results = []
        for cfg in cfgs:  # a compared row comes after the row it is compared with: ratios as rows come
            r = measure(cfg) if args.in_process else measure_in_subprocess(cfg, args.timeout)
            results.append(r)
            _compare_with(results, cfgs[:len(results)], list(args.compare))
            print(_row(r), flush=True)
        per_round.append(results)
    results = [_median_round([rnd[j] for rnd in per_round]) for j in range(len(cfgs))]
    if rounds > 1:
        print(f"\nmedian over {rounds} rounds (ratios: median, lowest-highest)")
        print(HEADER)
        for r in results:
            print(_row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command="overlock benchmark " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["benchmark"]
                           else " ".join(sys.argv), environment=env, rounds=rounds, results=results), f, indent=2)
        print(f"wrote {args.json}")
    return 1 if any("error" in r for rnd in per_round for r in rnd) else 0
