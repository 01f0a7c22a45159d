# burrow: two commands do everything on a fresh Debian 12 host, as root.
#   make run    installs what is missing, builds, boots a workspace, runs a command in it, destroys it
#   make test   installs what is missing, builds, runs the whole test suite (what .ci/run calls)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test deps build build-debug image bench clean

deps:
	bash scripts/install-deps.sh

build: deps
	cargo build --release --workspace --bins

build-debug: deps
	cargo build --workspace --bins --tests

run: build
	bash scripts/demo.sh target/release

# The image is built once into the shared cache before the tests, so that no test
# pays for debootstrap and parallel tests do not wait on one another.
image: build-debug
	bash scripts/prepare-image.sh target/debug

test: image
	cargo nextest run --workspace --no-fail-fast --profile ci

bench: build
	bash scripts/install-deps.sh --bench
	cargo build --release -p burrow-fs -p burrow-netd --examples
	bash scripts/bench.sh target/release
	target/release/examples/store_bench
	target/release/examples/rule_bench
	python3 scripts/bench_volumes.py target/release --store btrfs
	python3 scripts/bench_volumes.py target/release --store fuse
	python3 scripts/bench_network.py target/release

clean:
	cargo clean
