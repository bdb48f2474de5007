# Two commands for a newcomer: `make run` (set up, then serve the editor on 127.0.0.1:8188 with a tiny
# demo model) and `make test` (set up, static checks, then the whole suite). Both are idempotent.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements/lock.txt
DATA   ?= data
HOST   ?= 127.0.0.1
PORT   ?= 8188
WEB_SOURCES := $(shell find web/src -type f 2>/dev/null) web/package.json web/package-lock.json web/build.mjs web/tsconfig.json
NODE_MODULES := web/node_modules/.installed

# torch is installed on its own, outside the lock, because its build (CPU or CUDA) depends on where it comes
# from: empty = pip's own choice (on Linux x86_64 PyPI's build is the CUDA one; a machine whose pip finds a
# local CPU wheel takes that); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the CPU build.
TORCH  := torch==2.13.0
TORCH_INDEX_URL ?=
PIP_VERSION := 26.3
# Installed without their declared dependencies, which would pull a CUDA torch and training tools the tests
# never import: k-diffusion is the independent reference of the sampler parity tests (its sampling module
# needs only torch, scipy, torchsde and torchdiffeq, which the lock pins).
NO_DEPS := "k-diffusion==0.1.1.post1"
UV_VERSION  := 0.13.9
# spandrel (upscale models) and the torchvision it imports go to a folder of their own, which the product puts on
# sys.path only when an upscaler is loaded (nodes/models/upscale.py): where torchvision's wheel does not match
# the torch build (PyPI's CUDA torchvision beside a CPU torch, as on a CPU-only machine), an importable
# torchvision breaks `import diffusers`. Their other dependencies (numpy, safetensors, pillow) are in the lock.
UPSCALE_DIR := $(VENV)/extras/upscale
UPSCALE     := "spandrel==0.4.2" "einops==0.8.2" "torchvision==0.28.0"
# comfy-catapult (a ComfyUI client the tests run against sdflow) pins websockets<13 and older attrs, rich and
# aiofiles than sdflow's; it gets its own locked set (requirements/comfy-catapult.txt, `make lock`) in a folder the
# test puts first on the path of the interpreter that runs it.
CATAPULT_DIR  := $(VENV)/extras/comfy-catapult
CATAPULT_LOCK := requirements/comfy-catapult.txt

# `make lock` resolves against torch's CPU build so that no CUDA package (nvidia-*, triton) enters the lock.
# uv reads neither pip's configuration nor its local wheel folder: it is handed pip's find-links where the
# machine has them (this kind of machine keeps torch's CPU wheel there), else the PyTorch CPU index.
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
LOCK_TORCH ?= $(if $(strip $(FIND_LINKS)),$(addprefix --find-links ,$(FIND_LINKS)),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK_FLAGS ?=

.PHONY: run test check ruff mypy typecheck setup lock web browser bench clean

run: setup web
	$(BIN)/sdflow make-demo-model --data-dir $(DATA) --if-missing
	$(BIN)/sdflow serve --host $(HOST) --port $(PORT) --data-dir $(DATA)

test: check web browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

# Static checks, run by `make test` before the suite: ruff (lint), mypy (engine, nodes, server), tsc (web).
check: ruff mypy typecheck

ruff: setup
	$(BIN)/ruff check engine nodes server tests bench

mypy: setup
	$(BIN)/mypy

typecheck: $(NODE_MODULES)
	cd web && npx --no -- tsc --noEmit -p tsconfig.json

setup: $(STAMP)

# Everything but torch comes from the lock at its exact versions; the project itself is installed without
# dependencies, and check_lock fails when pyproject.toml asks for something the lock does not pin.
$(STAMP): $(LOCK) $(CATAPULT_LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),-c $(LOCK)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps $(NO_DEPS)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(UPSCALE_DIR) $(UPSCALE)
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(CATAPULT_DIR) -r $(CATAPULT_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python requirements/check_lock.py pyproject.toml $(LOCK) test
	touch $@

# Regenerates the lock from pyproject.toml (dependencies and the test extra). Pins already in the lock are
# kept unless pyproject.toml excludes them; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/uv --version 2>/dev/null | grep -qx "uv $(UV_VERSION)" || $(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 --no-emit-package torch \
	  $(LOCK_TORCH) --custom-compile-command "make lock" $(LOCK_FLAGS) --quiet -o $(LOCK)
	echo "comfy-catapult==3.0.0" | $(BIN)/uv pip compile - --python-version 3.11 --custom-compile-command "make lock" \
	  $(LOCK_FLAGS) --quiet -o $(CATAPULT_LOCK)
	@! grep -nE '^(nvidia-|triton|cuda-)' $(LOCK) || \
	  { echo "$(LOCK): a CUDA build of torch was resolved; set LOCK_TORCH to a source of its CPU build"; exit 1; }

# The editor bundle is built from web/src (never committed); rebuilt when a source is newer.
web: web/dist/index.html

web/dist/index.html: $(filter-out ,$(wildcard $(WEB_SOURCES))) $(NODE_MODULES)
	cd web && npm run build

$(NODE_MODULES): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

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
	rm -rf $(VENV) web/node_modules web/dist .mypy_cache .ruff_cache
