# The README's two commands. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so no dependency can pull another build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	SAM2_BUILD_CUDA=0 $(BIN)/pip install --quiet -e ".[demo,test]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/samprobe demo --out runs/demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
