# `make demo` and `make test` set up .venv on first use, then run. GPU machines (nvidia-smi
# works) keep pip's own torch; CPU machines are pinned to the CPU torch wheel, since an
# unpinned torch pulls several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints/cpu.txt)
EXTRAS ?= dev,tpe
RUN_DIR ?= runs/demo

export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing optimer-merge[$(EXTRAS)] into $(VENV) $(if $(HAS_CUDA),(CUDA found),(CPU torch)) ..."
	$(PY) -m pip install -qq --disable-pip-version-check $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/optimer-merge demo --run-dir $(RUN_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
