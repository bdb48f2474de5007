# Two commands for a newcomer: `make run` (set up, then serve the editor on 127.0.0.1:8188 with a tiny
# demo model) and `make test` (set up, then the whole suite). Both are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= data
HOST   ?= 127.0.0.1
PORT   ?= 8188
WEB_SOURCES := $(shell find web/src -type f 2>/dev/null) web/package.json web/package-lock.json web/build.mjs web/tsconfig.json

.PHONY: run test setup web browser bench clean

run: setup web
	$(BIN)/sdflow make-demo-model --data-dir $(DATA) --if-missing
	$(BIN)/sdflow serve --host $(HOST) --port $(PORT) --data-dir $(DATA)

test: setup web browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

setup: $(STAMP)

# torch is pinned to the CPU build in pyproject.toml (torch==2.13.0); nothing pulls CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The editor bundle is built from web/src (never committed); rebuilt when a source is newer.
web: web/dist/index.html

web/dist/index.html: $(filter-out ,$(wildcard $(WEB_SOURCES)))
	cd web && npm ci --no-audit --no-fund && npm run build

# Browser tests drive Debian's Chromium (Playwright's own browser download cannot work here).
browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  (echo "installing Debian's chromium for the browser tests"; \
	   apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

bench: setup
	$(BIN)/python bench/executor.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) web/node_modules web/dist
