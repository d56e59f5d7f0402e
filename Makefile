# Two commands on a fresh machine:  `make demo` (a short real training run on 2 CPU ranks), `make test`.
# Each creates .venv and installs the pinned CPU torch first. GPU users: make TORCH_SPEC=torch test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint docs golden clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 2 -m pipetrain train --preset small \
		--schedule 1f1b --batch-size 32 --microbatches 8 --steps 600 --max-seconds 150 --lr 2e-3 --warmup 30 \
		--eval-every 100 --log-every 50 --checkpoint-dir runs/demo/checkpoints --checkpoint-every 200 \
		--metrics-jsonl runs/demo/metrics.jsonl --plot runs/demo/loss.png --sample-tokens 40

test: $(BIN)/.installed
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/lint-imports

# The documentation site (docs/, mkdocs.yml) into build/site; --strict fails on a broken link or image.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

golden: $(BIN)/.installed
	$(BIN)/python tests/regen_golden.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
