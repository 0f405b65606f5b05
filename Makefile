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

# The main job on an embedded default: write a tiny Llama checkpoint, stream it tensor by tensor
# through NF4 quantization with double quantization, and print its storage report.
demo: $(VENV)/.installed
	$(PY) scripts/make_tiny_model.py out/tiny-llama
	$(VENV)/bin/qlora-jax info out/tiny-llama --quantize

# The test suite, parity tests against bitsandbytes / transformers included (CPU).
test: $(VENV)/.installed-test
	$(VENV)/bin/pytest -q

# Quantize / dequantize throughput against bitsandbytes on the same tensors (docs/benchmarks.md).
bench: $(VENV)/.installed-test
	$(PY) scripts/bench_quant.py

clean:
	rm -rf $(VENV) out build dist *.egg-info
