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
