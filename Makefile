# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ARGS ?=

.PHONY: demo test venv clean gpu-check

venv: $(STAMP)

# torch is pinned to the CPU wheel that lies on these machines' disk; clusters use the container's build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import torch, megatron.core, periln_megatron" 
	touch $(STAMP)

# Peri-LN vs Pre-LN in miniature, about 8 minutes on 2 idle cores (14 CPU-minutes): demo_out/report.md. Options through DEMO_ARGS,
# e.g. make demo DEMO_ARGS="--lr 3e-2 --steps 300 --seeds 2" (python -m periln_megatron.demo --help).
demo: $(STAMP)
	$(PY) -m periln_megatron.demo $(DEMO_ARGS)

# Two pytest workers (pytest-xdist): about half of a serial run's wall time is waiting (Slurm daemons,
# process start-ups, checkpoints on disk); the Slurm tests share one worker (tests/conftest.py's scheduler).
TEST_WORKERS ?= 2
test: $(STAMP)
	@if [ -x tools/ensure_slurm.sh ]; then tools/ensure_slurm.sh; fi
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

# On a GPU machine, inside the image with this checkout mounted (docs/gpu_check.md): te backend, bf16/FP8
# and their agreement, DP=2 with the paper flags + async save, PP=2, TP=2+SP, -m gpu tests, checkpoints -> HF.
# Uses the image's python and CUDA builds (not .venv, whose torch is the CPU wheel); this checkout's package.
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) tools/gpu_smoke.py --record benchmarks/RESULTS_gpu_smoke.md

clean:
	rm -rf $(VENV) build *.egg-info
