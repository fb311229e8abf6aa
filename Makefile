# vmckpt: the two commands of the README, and the pieces they are made of.
PYTHON ?= python3
STORE ?= demo-store
MEMORY ?= 512M

.PHONY: all deps guest demo test lint typecheck check-code bench clean

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

clean:
	$(MAKE) -C guest clean
	rm -rf $(STORE) .mypy_cache .ruff_cache .pytest_cache
