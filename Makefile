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

benchmark: venv
	sh benchmarks/run.sh

# Semantic segmentation on generated scenes (scikit-learn digits on scikit-image textures, one class per digit):
# overlock_xt UperNet from scratch on the CPU, mIoU on held-out scenes, overlays in runs/demo-seg/overlays.
# One torch thread: the data worker gets the other core (and small ops run faster than with two threads).
.PHONY: demo-seg
DEMO_SEG_DATA ?= demo-data/scenes
DEMO_SEG_RUN ?= runs/demo-seg
DEMO_SEG_ITERS ?= 240
demo-seg: venv
	$(PY) -m overlock.data.scenes $(DEMO_SEG_DATA) --train 800 --val 100 --size 64
	rm -rf $(DEMO_SEG_RUN)
	OMP_NUM_THREADS=1 $(VENV)/bin/overlock train-seg --data-dir $(DEMO_SEG_DATA) --model overlock_xt \
		--channels 64 --aux-channels 32 --crop-size 64 64 --scale 64 64 --ratio-range 0.75 1.5 -b 8 \
		--iters $(DEMO_SEG_ITERS) --eval-interval 80 --warmup-iters 20 --lr 2e-3 --drop-path 0 -j 1 \
		--output $(DEMO_SEG_RUN)
	OMP_NUM_THREADS=1 $(VENV)/bin/overlock eval-seg --data-dir $(DEMO_SEG_DATA) --checkpoint $(DEMO_SEG_RUN)/best.pth \
		--scale 64 64 -j 1 --results-file $(DEMO_SEG_RUN)/eval.json
	$(VENV)/bin/overlock segment --checkpoint $(DEMO_SEG_RUN)/best.pth --scale 64 64 -o $(DEMO_SEG_RUN)/overlays \
		$$(ls $(DEMO_SEG_DATA)/images/val/*.png | head -8)
