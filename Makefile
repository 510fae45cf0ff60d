# Two commands that work on a fresh machine: `make test` and `make demo`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := out/demo

.PHONY: venv test lint unit demo demo-live bench bench-transfer bench-agent bench-telemetry fuzz fuzz-minimize bench-fuzz dist arm64-check clean

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

# atheris harnesses (tests/fuzz/, docs/security.md "Fuzzing"), FUZZ_SECONDS each. New inputs that reach new code are
# added to tests/fuzz/corpus/<harness>/ (make test replays that directory); a crash, hang or broken invariant stops
# the run and is written there as crash-*/timeout-*, so make test fails until it is fixed.
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES ?= bundle manifest oip_http oip_mqtt chunks config tuf
fuzz: venv
	@for h in $(FUZZ_HARNESSES); do \
		echo "fuzz $$h: $(FUZZ_SECONDS) s"; \
		$(BIN)/python -m tests.fuzz.runner $$h tests/fuzz/corpus/$$h -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
			-rss_limit_mb=2048 -artifact_prefix=tests/fuzz/corpus/$$h/ -print_final_stats=1 || exit 1; \
	done

# the corpus shrunk to the inputs that keep its coverage (libFuzzer -merge=1), seeds and crash-* kept: what is committed
fuzz-minimize: venv
	$(BIN)/python -m tests.fuzz.minimize $(FUZZ_HARNESSES)

# 1,000,000 executions per harness (docs/benchmarks.md, Fuzzing)
bench-fuzz: venv
	$(BIN)/python benchmarks/fuzz_bench.py --out benchmarks/results/fuzz.json

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
