# Developer entry points. `make test` and `make demo` work on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision versions for the venv; override to use another build (TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-fast demo info benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,train,demo]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

info: venv
	$(VENV)/bin/overlock info

# The main job on embedded data: scikit-learn's 1,797 digit scans as an ImageFolder, overlock_xt trained from
# scratch on the CPU (about 4 minutes on 2 cores), curves in runs/demo/curves.png, then a few held-out predictions.
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
# scenes, then annotated images in runs/demo-det/detections.
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
		--img-scale 96 96 -b 8 --rcnn-samples 128 --epochs $(DET_EPOCHS) --lr-steps $$(($(DET_EPOCHS) - 1)) \
		--lr 1e-3 --warmup-iters 30 --val-freq 2 -j 1 --output $(DET_RUN)
	$(VENV)/bin/overlock detect $$(ls $(DET_DATA)/val/*.png | head -8) --checkpoint $(DET_RUN)/last.pth \
		--score-thr 0.2 --output $(DET_RUN)/detections

benchmark: venv
	sh benchmarks/run.sh
