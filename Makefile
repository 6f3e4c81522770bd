# Two commands a new user runs (see README): `make demo` and `make test`.
# Both create ./.venv with Python 3.11 and install the plugin (areal==1.0.4 comes with it).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m areal_a3po.demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)
