# burrow: two commands do everything on a fresh Debian 12 host, as root.
#   make run    installs what is missing, builds, boots a workspace, runs a command in it, destroys it
#   make test   installs what is missing, builds, runs the whole test suite (what .ci/run calls)
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test deps build build-debug agent agent-debug image bench bench-smoke install clean

# The guest agent is one static binary (PID 1 of workspaces and container VMs alike:
# a container VM has no root file system to take libraries from). --target keeps
# the static flag off build scripts and proc-macros; it lands in
# target/$(AGENT_TARGET)/<profile>/burrow-agent, where burrowd looks first.
AGENT_TARGET := x86_64-unknown-linux-gnu
STATIC := RUSTFLAGS='-C target-feature=+crt-static'
PREFIX ?= /usr/local

deps:
	bash scripts/install-deps.sh

build: deps agent
	cargo build --release --workspace --bins

build-debug: deps agent-debug
	cargo build --workspace --bins --tests

agent: deps
	$(STATIC) cargo build --release -p burrow-agent --target $(AGENT_TARGET)

agent-debug: deps
	$(STATIC) cargo build -p burrow-agent --target $(AGENT_TARGET)

# burrowd finds its companions next to itself and the agent in $(PREFIX)/lib/burrow.
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/burrow
	for b in burrow burrowd burrow-console burrow-netd burrow-cowfs burrow-runtime containerd-shim-burrow-v2; do \
	  install -m 0755 target/release/$$b $(DESTDIR)$(PREFIX)/bin/$$b; done
	install -m 0755 target/$(AGENT_TARGET)/release/burrow-agent $(DESTDIR)$(PREFIX)/lib/burrow/burrow-agent

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
