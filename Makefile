# Two commands matter: `make demo` and `make test` (plus `make demo-vlm`, the vision-language job).
# All set up .venv first (idempotent, stamped).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# torch is pinned here (not in pyproject) so GPU users keep their own build: this pair lies on
# the CI machine's disk; an unpinned torch would download several GB.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup prepare demo demo-vlm smoke-vlm test bench gpu-check clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,plots]'
	touch $(STAMP)

prepare: setup
	$(VENV)/bin/vlm-treegrpo prepare smollm2-135m-instruct

demo: prepare
	$(VENV)/bin/vlm-treegrpo train --config configs/demo-smollm2.yaml

# The vision-language job: smolvlm-smollm2 (SmolLM2-135M-Instruct behind an image encoder aligned
# here on first use, then cached), then tree-style GRPO on visual math problems; writes
# runs/demo-vlm/summary.json. `make smoke-vlm`: the tiny random-init VLM job (about 90 s).
demo-vlm: prepare
	$(VENV)/bin/vlm-treegrpo prepare smolvlm-smollm2
	$(VENV)/bin/vlm-treegrpo train --config configs/demo-vlm.yaml

smoke-vlm: setup
	$(VENV)/bin/vlm-treegrpo train --config configs/smoke-vlm.yaml

test: setup
	$(PY) -m pytest -q tests

# Our trainer against TRL's GRPOTrainer (SmolLM2-135M, arithmetic); BENCH_ARGS=--quick for a smoke run.
bench: prepare
	$(PY) -m pip install -q -e '.[bench]'
	$(VENV)/bin/vlm-treegrpo bench $(BENCH_ARGS)

# On a CUDA machine: GPU tests, both benchmark workloads and the step profile (scripts/gpu_check.sh).
gpu-check: prepare
	$(PY) -m pip install -q -e '.[bench]'
	PYTHON=$(PY) scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
