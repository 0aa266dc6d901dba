# The README's two commands. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so no dependency can pull another build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo,test]"
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/samprobe demo --out runs/demo

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

# Static checks: formatting, lint, and code repeated across src/ (pylint's similarity checker,
# blocks of 6 or more lines; --persistent=n: no stats file in the home directory).
lint: $(VENV)/.test-installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pylint --persistent=n --disable=all --enable=duplicate-code --min-similarity-lines=6 src/

clean:
	rm -rf $(VENV) runs
