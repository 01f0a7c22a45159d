# burrow: two commands do everything on a fresh Debian 12 host, as root.
#   make run    installs what is missing, builds, boots a workspace, runs a command in it, destroys it
#   make test   installs what is missing, builds, runs the whole test suite (what .ci/run calls)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test deps build build-debug image bench bench-smoke clean

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

# The tests, then one iteration of every benchmark (no targets asserted), so that
# a benchmark that breaks breaks the build.
test: image
	cargo nextest run --workspace --no-fail-fast --profile ci
	$(MAKE) bench-smoke

bench-smoke: image
	cargo build -p burrow-fs -p burrow-netd --examples
	bash scripts/bench.sh debug --smoke

bench: build
	bash scripts/install-deps.sh --bench
	cargo build --release -p burrow-fs -p burrow-netd --examples
	bash scripts/bench.sh release

clean:
	cargo clean
