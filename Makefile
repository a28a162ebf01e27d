# Two entry points: `make demo` and `make test`. Both build .venv on first use (see tools/setup_env.sh).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo

# Idempotent: every step checks what is already installed; the mmcv wheel is cached in ~/.cache.
setup:
	PYTHON=$(PYTHON) bash tools/setup_env.sh
	touch $(STAMP)

$(STAMP): tools/setup_env.sh pyproject.toml
	$(MAKE) setup

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) tools/demo.py
