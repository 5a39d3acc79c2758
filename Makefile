# Both entry points install what they need first (scripts/setup.sh is idempotent: a second run is a no-op).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-all bench lint

setup:
	@bash scripts/setup.sh

# The main job on its embedded default: local, CPU, configs/quickstart.yaml.
run: setup
	$(VENV)/bin/afil-ray demos --config configs/quickstart.yaml $(ARGS)
	$(VENV)/bin/afil-ray replay stats runs/replay

# The test suite (slow checks excluded; `make test-all` includes them).
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) benchmarks/bench_env.py
	$(PY) benchmarks/bench_replay.py

lint: setup
	$(VENV)/bin/ruff check afil_ray actors learners tests benchmarks
