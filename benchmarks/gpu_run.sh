#!/bin/sh
# Issue #12, GPU part: the measurements recorded in benchmarks/gpu_*.json, in one run on a CUDA machine, from the
# repository root, with a python that has torch, timm and safetensors (the package need not be installed).
# OFFICIAL_CODE=/path/to/a/checkout/of/LMMMEng/OverLoCK adds the official implementation itself (natten replaced
# by its own unfold fallback) to the training row.
OUT=${OUT:-benchmarks}
PY=${PY:-python3}
B=${B:-128}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OFFICIAL=${OFFICIAL_CODE:+--official-code $OFFICIAL_CODE}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv
# 1. training step (aux loss, fused AdamW), bf16 autocast, channels_last, vs convnext_tiny and the official method
$PY -m overlock benchmark --device cuda --model overlock_t --compare convnext_tiny --official $OFFICIAL --mode train \
    -b $B --amp --amp-dtype bfloat16 --warmup 3 --repeats 10 --timeout 150 --json $OUT/gpu_train_t_b${B}_224_bf16.json
# 2. inference, bf16 autocast, deploy form
$PY -m overlock benchmark --device cuda --model overlock_t --compare convnext_tiny --official --mode infer -b $B \
    --amp --amp-dtype bfloat16 --warmup 3 --repeats 10 --timeout 120 --json $OUT/gpu_infer_t_b${B}_224_bf16.json
# 3. exactness on the GPU, where a training step's time goes, what the aggregation costs
$PY benchmarks/gpu_profile.py --batch $B --json $OUT/gpu_profile_t_b${B}.json --profile $OUT/gpu_profile_t_b${B}.txt
# 4. torch.compile (compile time not counted)
$PY -m overlock benchmark --device cuda --model overlock_t --compare convnext_tiny --mode train -b $B --compile \
    --amp --amp-dtype bfloat16 --warmup 3 --repeats 10 --timeout 120 --json $OUT/gpu_train_t_b${B}_224_bf16_compile.json
