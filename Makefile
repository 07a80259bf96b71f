# The README's first two commands are `make demo` and `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: demo test install lint typecheck unit bench-cpu

demo:  ## install kvtier with vLLM (CPU) and run the main job on host memory + local disk
	scripts/install.sh vllm
	kvtier demo

install:
	scripts/install.sh all

lint:
	$(PYTHON) -m ruff check kvtier tests bench

typecheck:
	$(PYTHON) -m mypy

unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test: install lint typecheck unit  ## install everything the tests need, then lint, type-check, test

bench-cpu:  ## CPU benchmarks; results go to bench/results/
	bench/run_cpu.sh
