# Both entry points install what they need first (scripts/setup.sh is idempotent: a second run is a no-op).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test test-all bench lint

setup:
	@bash scripts/setup.sh

# The main job on its embedded default: local Ray, CPU, configs/quickstart.yaml. Each stage is cached: demos
# already in the store and a finished pre-training are not redone. ARGS are overrides for every stage.
QUICKSTART := configs/quickstart.yaml
run: setup
	$(VENV)/bin/afil-ray demos --config $(QUICKSTART) $(ARGS)
	$(VENV)/bin/afil-ray train --config $(QUICKSTART) $(ARGS)
	$(VENV)/bin/afil-ray run --config $(QUICKSTART) $(ARGS)

# The test suite (slow checks excluded; `make test-all` includes them).
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) benchmarks/bench_env.py
	$(PY) benchmarks/bench_replay.py
	$(PY) benchmarks/bench_sampling.py
	$(PY) benchmarks/bench_train.py

lint: setup
	$(VENV)/bin/ruff check afil_ray actors learners tests benchmarks
