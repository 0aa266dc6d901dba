# The README's two commands. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so no dependency can pull another build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test browser clean

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

# Debian's chromium for the report's browser test (tests/test_report_browser.py skips, saying why, without it).
# apt-get needs root: run as root (CI) or with SUDO=sudo.
SUDO ?=
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "make browser: could not install chromium; the report's browser test will be skipped"

clean:
	rm -rf $(VENV) runs
