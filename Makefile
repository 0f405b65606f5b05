# Each target makes its own virtual environment (.venv) and installs what it needs, so both work
# on a fresh machine:  make demo   |   make test   |   make bench
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml setup.py | $(PY)
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed

# The main job on an embedded default: QLoRA fine-tuning of a tiny built-in model on a built-in
# synthetic task, with a before/after evaluation on held-out prompts (CPU, well under 5 minutes).
demo: $(VENV)/.installed
	$(VENV)/bin/qlora-jax train configs/demo.yaml

# The test suite, parity tests against bitsandbytes / transformers included (CPU): the fast
# default suite, then the slow step (8-device and multi-process runs, in subprocesses).
test: $(VENV)/.installed-test
	$(VENV)/bin/pytest -q
	$(VENV)/bin/pytest -q -m "slow and not gpu"

# Quantize / dequantize throughput against bitsandbytes on the same tensors (docs/benchmarks.md).
bench: $(VENV)/.installed-test
	$(PY) scripts/bench_quant.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
