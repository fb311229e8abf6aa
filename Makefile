# vmckpt: the two commands of the README (`make demo`, `make test`) and the pieces they are
# made of. Both install what they need first (scripts/install-deps.sh; idempotent, seconds
# when everything is there) into the system (Debian packages) and into .venv (Python).
VENV    ?= .venv
PYTHON  ?= $(VENV)/bin/python
STORE   ?= demo-store
MEMORY  ?= 512M
# The microkernel test systems, in this repository (guest/genode-hw-pc, guest/fiasco-l4re).
GUEST_IMAGES ?= $(abspath guest)
export GUEST_IMAGES

.PHONY: all deps-demo deps-test guest demo test test-fast lint typecheck check-code \
        bench bench-s3 bench-lazy bench-migrate bench-microkernels clean genode genode-demo fiasco-demo

all: guest

deps-demo:
	bash scripts/install-deps.sh demo

deps-test:
	bash scripts/install-deps.sh test

guest:
	$(MAKE) -C guest

## One command: install what the demo needs, build the guest, boot it, checkpoint it
## incrementally, restore the middle layer, show it carrying on.
demo: deps-demo guest
	$(PYTHON) scripts/demo.py --store $(STORE) --memory $(MEMORY)

## Every test: lint, types, and the pytest suite with real QEMU guests under TCG
## (QEMU 10 from the system, QEMU 11 for the COLO tests).
test: deps-test guest check-code
	$(PYTHON) -m pytest -v tests

## The tests that boot no guest (about 2 minutes): the format, the stream, the CLI's parsing,
## the stores in a bucket. Some read the guest's kernel and initrd without booting them.
test-fast: deps-test guest check-code
	$(PYTHON) -m pytest -q -m "not qemu" tests

check-code: lint typecheck

lint:
	$(PYTHON) -m ruff check vmckpt tests scripts benchmarks
	$(PYTHON) -m ruff format --check vmckpt tests scripts benchmarks

typecheck:
	$(PYTHON) -m mypy

## The checkpoint benchmark: colo and precopy-diff against QEMU's baselines, and a RAM sweep;
## tables, raw JSON, plots. On QEMU 11 (the one that runs colo).
QEMU11 ?= /var/cache/vmckpt/qemu-11/bin/qemu-system-x86_64
BENCH_ARGS ?= --sizes 256M,1G,4G --rates 100 --count 10 --qemu $(QEMU11)
BENCH_OUT ?= /tmp/vmckpt-bench

## Then precopy-diff's memory: peak RSS per checkpoint against guest RAM, before (two whole
## images) and after (bounded), and its pause under watch at 1 GiB, on the system's QEMU 10
## (where precopy-diff is the mechanism). MEMBENCH_SIZES=256M,1G,2G,4G adds the 4 GiB point.
QEMU10 ?= qemu-system-x86_64
MEMBENCH_SIZES ?= 256M,1G,2G
MEMBENCH_ARGS ?= --sizes $(MEMBENCH_SIZES) --count 3 --watch-size 1G --watch-count 30 --qemu $(QEMU10)

bench: deps-test guest
	$(PYTHON) -m benchmarks.checkpoint $(BENCH_ARGS) --plot $(BENCH_OUT).png --json $(BENCH_OUT).json
	$(PYTHON) -m benchmarks.precopy_memory $(MEMBENCH_ARGS) --plot $(BENCH_OUT)-precopy-memory.png \
		--json $(BENCH_OUT)-precopy-memory.json
	$(PYTHON) -m benchmarks.lazy $(LAZY_ARGS) --plot $(BENCH_OUT)-lazy.png --json $(BENCH_OUT)-lazy.json
	$(PYTHON) -m benchmarks.disk_restore --json $(BENCH_OUT)-disk-restore.json

## A store in an S3 bucket (SeaweedFS started here) against a directory store, same run:
## pause, time until the layer is visible, bytes uploaded, restore on a second host.
S3BENCH_SIZES ?= 256M,2G
bench-s3: deps-test guest
	$(PYTHON) -m benchmarks.s3_store --sizes $(S3BENCH_SIZES) --json $(BENCH_OUT)-s3.json

## Restore: lazy (postcopy from the store) against the full restore and QEMU's own
## migrate-incoming from a file, guests of 1, 4 and 8 GiB with >= 90 % of RAM in use.
LAZY_ARGS ?= --sizes 1G,4G,8G --repeat 3
bench-lazy: deps-test guest
	$(PYTHON) -m benchmarks.lazy $(LAZY_ARGS) --plot $(BENCH_OUT)-lazy.png --json $(BENCH_OUT)-lazy.json

## Migration to another host (a network namespace with its own sshd; needs root).
bench-migrate: deps-test guest
	$(PYTHON) -m benchmarks.migrate --json $(BENCH_OUT)-migrate.json

## Microkernel guests (README: Microkernel guests): the images in guest/ by default, or
## GENODE_ISO=, GENODE_MULTIBOOT_DIR=, FIASCO_IMAGE=. `make genode` boots Genode and follows
## its console; the demos checkpoint x3, restore the middle layer and check every tick.
GENODE_ISO ?= $(GUEST_IMAGES)/genode-hw-pc/genode-hw-pc-ckpt_counter.iso
GENODE_MULTIBOOT_DIR ?= $(GUEST_IMAGES)/genode-hw-pc/multiboot
FIASCO_IMAGE ?= $(GUEST_IMAGES)/fiasco-l4re/bootstrap_ticker.elf
export GENODE_ISO GENODE_MULTIBOOT_DIR FIASCO_IMAGE
GENODE_STORE ?= genode-store
FIASCO_STORE ?= fiasco-store

genode: deps-demo
	$(PYTHON) scripts/microkernel_demo.py genode-iso --store $(GENODE_STORE)

genode-demo: deps-demo
	$(PYTHON) scripts/microkernel_demo.py genode-iso --store $(GENODE_STORE) --demo

fiasco-demo: deps-demo
	$(PYTHON) scripts/microkernel_demo.py fiasco --store $(FIASCO_STORE) --demo

## The microkernel benchmark row: Genode (ISO, multiboot), Fiasco.OC and the Linux test guest.
bench-microkernels: deps-test guest
	$(PYTHON) -m benchmarks.microkernels --json $(BENCH_OUT)-microkernels.json

clean:
	$(MAKE) -C guest clean
	rm -rf $(STORE) $(GENODE_STORE) $(FIASCO_STORE) .mypy_cache .ruff_cache .pytest_cache
