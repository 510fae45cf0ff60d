# Two commands that work on a fresh machine: `make test` and `make demo`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := out/demo

.PHONY: venv test lint unit demo demo-live bench bench-transfer bench-agent bench-telemetry dist arm64-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install --quiet 'torch==2.13.0'
	$(BIN)/pip install --quiet -e '.[packager,dev]'
	touch $(STAMP)

# lint-imports checks the import contracts in pyproject.toml (docs/architecture.md); --no-cache: the graph takes
# well under a second to build, and no cache directory is left in the tree.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

test: lint
	$(BIN)/pytest -q

unit: venv
	$(BIN)/pytest -q tests/unit

demo: venv
	$(BIN)/python -m examples.demo --out $(DEMO)

# the demo's fleet stays up and its dashboard is served until Ctrl-C
demo-live: venv
	$(BIN)/python -m examples.demo --out $(DEMO) --live

bench: venv
	$(BIN)/python benchmarks/packager_bench.py --out benchmarks/results/packager.json

bench-transfer: venv
	$(BIN)/python benchmarks/transfer_bench.py --out benchmarks/results/transfer.json

bench-agent: venv
	$(BIN)/python benchmarks/agent_bench.py --out benchmarks/results/agent.json

bench-telemetry: venv
	$(BIN)/python benchmarks/telemetry_bench.py --out benchmarks/results/telemetry.json

# the wheel and sdist a device installs (pip install dist/edgeship-*.whl into /opt/edgeship: docs/install-device.md)
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# not in CI: an arm64 Debian root under qemu-user-static installs the wheel and verifies and fetches a bundle
# (needs root, debootstrap, qemu-user-static; scripts/arm64_check.sh)
arm64-check: venv
	scripts/arm64_check.sh

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
