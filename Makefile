# The README's first two commands are `make demo` and `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: demo test install lint typecheck unit bench-cpu

demo:  ## install kvtier with vLLM (CPU) and run the main job on host memory + local disk
	scripts/install.sh vllm
	$(PYTHON) -m kvtier demo

install:
	scripts/install.sh all

lint:
	$(PYTHON) -m ruff check kvtier tests bench

typecheck:
	$(PYTHON) -m mypy

# Suites that need triton (SGLang, Triton's CPU interpreter) run apart, with the side folder on
# their path: triton must never be importable next to vLLM on a CPU machine.
SIDECAR_TESTS = tests/transfer/test_transfer_triton_interp.py tests/transfer/test_pack_rows.py \
	tests/transfer/test_peer_rows.py \
	tests/integrations/test_sglang_storage.py
unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) $(addprefix --ignore=,$(SIDECAR_TESTS))
	PYTHONPATH=.cache/sidecar $(PYTHON) -m pytest -q $(PYTEST_ARGS) $(SIDECAR_TESTS)

test: install lint typecheck unit  ## install everything the tests need, then lint, type-check, test

bench-cpu:  ## CPU benchmarks; results go to bench/results/
	bench/run_cpu.sh
