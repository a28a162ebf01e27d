# Two entry points: `make demo` and `make test`. Both build .venv on first use (see tools/setup_env.sh).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

# `make test CPU=avx2`: the tests whose outcome depends on the processor's instructions (precision,
# fused oneDNN kernels, the fast path, bf16 autocast, the benchmark and its checks) on an
# emulated AVX2-only CPU: ATen's and oneDNN's kernels capped at AVX2 (no AVX-512, no AMX, no bf16).
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
CPU_BOUND_TESTS := tests/models tests/export/test_backbone_export.py tests/weights tests/engine/test_amp.py \
	tests/benchmark tests/test_cpu.py
PYTEST := -m pytest -q -n 2 --dist loadfile

# `make test STACK=floor`: the compatibility selection (tests/compat_tests.txt) in the oldest stack tested
# (torch 2.1, Python 3.10), built outside the repo, against birder's numbers recorded by .venv in the same
# run (tools/test_stack.sh; the stacks: docs/installation.md).
STACK ?= current

.PHONY: setup test demo

# Idempotent: every step checks what is already installed; the mmcv wheel is cached in ~/.cache.
setup:
	PYTHON=$(PYTHON) bash tools/setup_env.sh
	touch $(STAMP)

$(STAMP): tools/setup_env.sh pyproject.toml
	$(MAKE) setup

test: $(STAMP)
ifneq ($(STACK),current)
	bash tools/test_stack.sh $(STACK)
else ifeq ($(CPU),)
	$(PY) $(PYTEST) tests
else ifeq ($(CPU),avx2)
	$(AVX2_ONLY) $(PY) -m hieradet_mmdet.cpu --expect avx2
	$(AVX2_ONLY) $(PY) $(PYTEST) $(CPU_BOUND_TESTS)
else
	$(error CPU=$(CPU) is not emulated here; CPU=avx2 is)
endif

demo: $(STAMP)
	$(PY) tools/demo.py
