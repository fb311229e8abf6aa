# vmckpt: the two commands of the README, and the pieces they are made of.
PYTHON ?= python3
STORE ?= demo-store
MEMORY ?= 512M

.PHONY: all deps guest demo test lint typecheck check-code bench bench-migrate clean genode genode-demo

all: guest

deps:
	bash scripts/install-deps.sh

guest:
	$(MAKE) -C guest

## One command: install what is needed, build the guest, boot, checkpoint x3, restore, carry on.
demo: deps guest
	$(PYTHON) scripts/demo.py --store $(STORE) --memory $(MEMORY)

## Every test: lint, types, and the pytest suite with real QEMU guests under TCG.
test: guest check-code
	$(PYTHON) -m pytest -v tests

check-code: lint typecheck

lint:
	$(PYTHON) -m ruff check vmckpt tests scripts
	$(PYTHON) -m ruff format --check vmckpt tests scripts

typecheck:
	$(PYTHON) -m mypy

## The checkpoint benchmark (issue 5): vmckpt against QEMU's baselines; tables, raw JSON, a plot.
BENCH_ARGS ?= --sizes 256M,1G --rates 0,100,2000 --count 10
BENCH_OUT ?= /tmp/vmckpt-bench

bench: guest
	$(PYTHON) -c 'import matplotlib' 2>/dev/null || $(PYTHON) -m pip install -q 'matplotlib>=3.8'
	$(PYTHON) -m vmckpt bench $(BENCH_ARGS) --plot $(BENCH_OUT).png --json $(BENCH_OUT).json

## Migration to another host (a network namespace with its own sshd; needs root).
bench-migrate: guest
	$(PYTHON) scripts/bench_migrate.py --json $(BENCH_OUT)-migrate.json

## A Genode scenario on an ISO built with Genode's run tool (see README, "Genode guests").
GENODE_ISO ?=
GENODE_STORE ?= genode-store

genode genode-demo:
	@if [ -z "$(GENODE_ISO)" ] || [ ! -f "$(GENODE_ISO)" ]; then \
	  echo "$@: no Genode image$(if $(GENODE_ISO), at $(GENODE_ISO),): build one with Genode's run tool and pass GENODE_ISO=path/to/image.iso (see README)" >&2; exit 1; fi
	$(PYTHON) scripts/genode_demo.py --iso "$(GENODE_ISO)" --store $(GENODE_STORE) --memory $(MEMORY) \
	  $(if $(filter genode-demo,$@),--demo)

clean:
	$(MAKE) -C guest clean
	rm -rf $(STORE) .mypy_cache .ruff_cache .pytest_cache
