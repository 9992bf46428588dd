# Developer entry points. `make test` and `make demo` work on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision versions for the venv; override to use another build (TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-all demo info benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,train,demo]"
	touch $@

venv: $(VENV)/.installed

# `make test`: the quick tests a developer runs often (not marked slow). `make test-all`: every test, what CI
# runs, with the slowest listed.
test: venv
	$(PY) -m pytest -q -m "not slow" --durations=5

test-all: venv
	$(PY) -m pytest -q --durations=15

info: venv
	$(VENV)/bin/overlock info

# The main job on embedded data: scikit-learn's 1,797 digit scans as an ImageFolder, overlock_xt trained from
# scratch on the CPU (4-6 minutes on 2 cores), curves in runs/demo/curves.png, then a few held-out predictions.
DEMO_DATA ?= demo-data/digits
DEMO_RUN ?= runs/demo
demo: venv
	$(PY) -m overlock.data.digits $(DEMO_DATA)
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/overlock train --data-dir $(DEMO_DATA) --model overlock_xt --img-size 32 -b 32 --epochs 4 \
		--warmup-epochs 0 --cooldown-epochs 0 --sched-on-updates --lr 1e-3 --hflip 0 --aa '' --mixup 0 --cutmix 0 \
		--reprob 0 --scale 0.6 1 --color-jitter 0 -j 2 --output $(DEMO_RUN)
	$(VENV)/bin/overlock predict --checkpoint $(DEMO_RUN)/best.pth --topk 3 \
		$$(ls $(DEMO_DATA)/val/*/*.png | awk 'NR % 40 == 1')

# Mask R-CNN on embedded data: generated digit scenes (scikit-learn's scans on scikit-image textures) written as
# COCO JSON, an overlock_xt Mask R-CNN trained from scratch on the CPU, box and mask AP (COCOeval) on held-out
# scenes, then annotated images in runs/demo-det/detections. About 5 minutes on 2 cores: small heads, 64 sampled
# RoIs per image (the RoI heads' cost scales with it), no flips (a mirrored digit is another shape), data loaded
# in the main process, one evaluation at the end.
DET_DATA ?= demo-data/scenes-coco
DET_RUN ?= runs/demo-det
DET_EPOCHS ?= 4
.PHONY: demo-det
demo-det: venv
	$(PY) -m overlock.detection.demo $(DET_DATA) --train 300 --val 50 --size 96
	rm -rf $(DET_RUN)
	$(VENV)/bin/overlock detect-train --train-ann $(DET_DATA)/annotations/instances_train.json \
		--train-images $(DET_DATA)/train --val-ann $(DET_DATA)/annotations/instances_val.json \
		--val-images $(DET_DATA)/val --model overlock_xt --fpn-channels 64 --box-fc 256 --mask-channels 64 \
		--img-scale 96 96 -b 8 --rcnn-samples 64 --flip 0 --epochs $(DET_EPOCHS) --lr-steps $$(($(DET_EPOCHS) - 1)) \
		--lr 1e-3 --warmup-iters 30 --val-freq $(DET_EPOCHS) -j 0 --output $(DET_RUN)
	$(VENV)/bin/overlock detect $$(ls $(DET_DATA)/val/*.png | head -8) --checkpoint $(DET_RUN)/last.pth \
		--score-thr 0.2 --output $(DET_RUN)/detections

benchmark: venv
	sh benchmarks/run.sh

# Semantic segmentation on generated scenes (scikit-learn digits on scikit-image textures, one class per digit):
# overlock_xt UperNet from scratch on the CPU, mIoU on held-out scenes, overlays in runs/demo-seg/overlays.
# About 5 minutes on 2 cores. One large digit per 32-pixel scene (the budget holds ~450 steps of batch 8), no flips
# (a mirrored digit is another shape), no scale or colour jitter, digit classes weighted 10x in the pixel loss (with plain
# weights background wins every pixel for hundreds of steps), one evaluation at the end, data in the main process.
.PHONY: demo-seg
DEMO_SEG_DATA ?= demo-data/scenes32
DEMO_SEG_RUN ?= runs/demo-seg
DEMO_SEG_ITERS ?= 450
demo-seg: venv
	$(PY) -m overlock.data.scenes $(DEMO_SEG_DATA) --train 1500 --val 100 --size 32 --max-digits 1 \
		--min-side 0.6 --max-side 0.9
	rm -rf $(DEMO_SEG_RUN)
	$(VENV)/bin/overlock train-seg --data-dir $(DEMO_SEG_DATA) --model overlock_xt --channels 64 --aux-channels 32 \
		--crop-size 32 32 --scale 32 32 --ratio-range 1 1 --flip 0 --no-photometric -b 8 \
		--class-weight 1 10 10 10 10 10 10 10 10 10 10 --iters $(DEMO_SEG_ITERS) --eval-interval $(DEMO_SEG_ITERS) \
		--warmup-iters 20 --lr 1e-3 --drop-path 0 -j 0 --output $(DEMO_SEG_RUN)
	$(VENV)/bin/overlock eval-seg --data-dir $(DEMO_SEG_DATA) --checkpoint $(DEMO_SEG_RUN)/best.pth \
		--scale 32 32 -j 0 --results-file $(DEMO_SEG_RUN)/eval.json
	$(VENV)/bin/overlock segment --checkpoint $(DEMO_SEG_RUN)/best.pth --scale 32 32 -o $(DEMO_SEG_RUN)/overlays \
		$$(ls $(DEMO_SEG_DATA)/images/val/*.png | head -8)
