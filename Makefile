# The README's two commands. Both create .venv when missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned, so no dependency can pull another build.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-native browser lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

# sam2 (test-only reference of SAM 2.1) ships as an sdist whose build needs torch: build it against
# the pinned torch already here (no isolated build env downloading another), without its CUDA extension.
$(VENV)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo,test]"
	$(BIN)/pip install --quiet setuptools wheel
	SAM2_BUILD_CUDA=0 $(BIN)/pip install --quiet --no-build-isolation "sam2==1.1.0"
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

test-native: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -m native

# Static checks: formatting, lint, and code repeated across src/ (pylint's similarity checker,
# blocks of 6 or more lines; --persistent=n: no stats file in the home directory).
lint: $(VENV)/.test-installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/pylint --persistent=n --disable=all --enable=duplicate-code --min-similarity-lines=6 src/

clean:
	rm -rf $(VENV) runs
