# ringbench: the commands of a fresh machine.
#   make lint   set up if needed, then ruff (lint and format) and mypy
#   make test   set up if needed, then run the default (fast) test suite
#   make test-cluster  set up if needed, bring up a one-node Slurm cluster (root, apt), run the
#               submitit tests on it (pytest -m cluster), then take down what it started
#   make test-browser  set up if needed, install Debian's chromium if missing (root, apt), then check the
#               HTML leaderboard in headless Chromium (the default suite skips that test without it)
#   make check-gpu  set up if needed, then the GPU tests and benchmarks (on a machine without CUDA: the tests
#               are collected and skipped, the benchmarks' CUDA code imported)
#   make demo   set up if needed, then run the main job on the embedded synthetic data
PY ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.ringbench-setup
# Idle OpenMP threads sleep instead of spinning: on a shared CPU machine spinning threads slow
# every torch process down many times over. Set before Python starts, so it reaches torch.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup lint test test-slow test-cluster test-browser check-gpu demo bench readme clean-venv

setup: $(STAMP)

# Re-runs when the dependency files change. torch/torchvision come from the pins in
# constraints.txt; Detectron2 is installed by its own installer (see docs/detectron2.md).
$(STAMP): pyproject.toml constraints.txt transfer/d2/install.py
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python 3.11 is needed; set PY=...)"; exit 2; }
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c constraints.txt -e '.[test,lint,detectron2]'
	$(PYTHON) -m transfer.d2.install
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# One pytest-xdist worker per core; heavy tests first (tests/conftest.py), idle workers steal the rest.
PYTEST_PARALLEL ?= -n auto --dist worksteal

test: setup
	$(PYTHON) -m pytest $(PYTEST_PARALLEL)

test-slow: setup
	$(PYTHON) -m pytest -m slow $(PYTEST_PARALLEL)

# A real Slurm cluster on this machine (tests/cluster/slurm_up.sh; needs root and apt), the submitit
# tests on it, then slurm_down.sh whatever happened; the exit code is pytest's (or slurm_up.sh's).
test-cluster: setup
	status=0; \
	if bash tests/cluster/slurm_up.sh; then $(PYTHON) -m pytest -m cluster tests/test_cluster.py || status=$$?; \
	else status=$$?; fi; \
	bash tests/cluster/slurm_down.sh; exit $$status

test-browser: setup
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(PYTHON) -m pytest tests/test_report_page.py -k chromium -rs

# The CUDA path, on a GPU machine: pytest -m gpu, then bench/gpu.py, each time-limited, one summary table
# (within eight minutes on one H100-class GPU). Without CUDA: the tests are collected and skipped, exit 0.
check-gpu: setup
	$(PYTHON) tests/check_gpu.py

demo: setup
	$(PYTHON) -m sweep --plan demo --executor local --jobs 2

bench: setup
	for script in $(filter-out bench/interleave.py bench/common.py bench/gpu.py,$(wildcard bench/*.py)); do echo "== $$script"; $(PYTHON) $$script || exit 1; done

# Refresh the task tables from the registry: the README's families, docs/tasks.md's tasks (tests/test_readme.py checks them).
readme: setup
	$(PYTHON) transfer/run.py --list-tasks --readme README.md
	$(PYTHON) transfer/run.py --list-tasks --readme docs/tasks.md

clean-venv:
	rm -rf $(VENV)
