#!/bin/sh
# The measurements recorded in benchmarks/*.json (see benchmarks/README.md). Run from the repository root on a
# quiet machine; each measurement runs in its own process. Override OVERLOCK with another entry point if needed.
# OFFICIAL_CODE=/path/to/a/checkout/of/LMMMEng/OverLoCK adds the official implementation itself to rows 1-4.
set -e
OVERLOCK=${OVERLOCK:-.venv/bin/overlock}
OUT=${OUT:-benchmarks}
OFFICIAL=${OFFICIAL_CODE:+--official-code $OFFICIAL_CODE}
# ROUNDS=N alternates the configurations of rows 1-2b N times (machines whose speed drifts): median and range
ROUNDS=${ROUNDS:-1}
PY=${PY:-.venv/bin/python}
# files are named for the CPU's vector ISA (timings differ between AVX2 and AVX-512 machines); the files
# without a suffix are the AVX2 records made before this naming
ISA=${ISA:-_$($PY -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")}
# 1. overlock_t inference, batch 16, 224 px: deploy form + channels_last vs the official method and convnext_tiny
$OVERLOCK benchmark --model overlock_t --compare convnext_tiny --official $OFFICIAL --mode infer -b 16 --img-size 224 \
    --warmup 1 --repeats 3 --rounds $ROUNDS --json $OUT/cpu_infer_t_b16_224$ISA.json
# 2. overlock_t training step (aux loss, AdamW), batch 8, 224 px vs the official method
$OVERLOCK benchmark --model overlock_t --compare convnext_tiny --official $OFFICIAL --mode train -b 8 --img-size 224 \
    --warmup 1 --repeats 3 --rounds $ROUNDS --json $OUT/cpu_train_t_b8_224$ISA.json
# 2b. overlock_t batch-1 latency, 224 px (issue #12: at most 1.5x convnext_tiny's)
$OVERLOCK benchmark --model overlock_t --compare convnext_tiny --official $OFFICIAL --mode infer -b 1 --img-size 224 \
    --warmup 2 --repeats 10 --rounds $ROUNDS --json $OUT/cpu_infer_t_b1_224$ISA.json
# 3. overlock_xt on one large image (peak memory) and scaling 224..1024
$OVERLOCK benchmark --model overlock_xt --official $OFFICIAL --mode infer -b 1 --img-size 1024 \
    --warmup 1 --repeats 3 --json $OUT/cpu_infer_xt_b1_1024$ISA.json
$OVERLOCK benchmark --model overlock_xt --mode infer -b 1 --img-size 224 448 640 1024 \
    --warmup 1 --repeats 3 --json $OUT/cpu_scaling_xt_b1$ISA.json
# 4. the demo setting: overlock_xt training at 32 px, batch 64
$OVERLOCK benchmark --model overlock_xt --official $OFFICIAL --mode train -b 64 --img-size 32 --num-classes 10 \
    --warmup 1 --repeats 3 --json $OUT/cpu_train_xt_b64_32$ISA.json
# 5. Mask R-CNN + overlock_t (random weights, 80 classes): inference at 800x1333 and one training step (batch 1)
$PY -m overlock.detection.bench --model overlock_t --mode infer --size 800 1333 --warmup 1 --repeats 3 \
    --json $OUT/cpu_infer_maskrcnn_t_800x1333$ISA.json
$PY -m overlock.detection.bench --model overlock_t --mode train --size 800 1333 --warmup 1 --repeats 3 \
    --json $OUT/cpu_train_maskrcnn_t_800x1333$ISA.json
# 6. UperNet + overlock_t (150 classes): inference at 512x512 (batch 1) and a training step (batch 2, aux loss,
#    AdamW), ours (tiled ContMix, channels_last) beside the same heads on the official method (unfold, NCHW) and,
#    with OFFICIAL_CODE, on the official mmseg backbone itself
$PY -m overlock.segmentation.bench --model overlock_t --img-size 512 --warmup 1 --repeats 3 $OFFICIAL \
    --json $OUT/cpu_upernet_t_512$ISA.json
