#!/usr/bin/env bash
# Builds the default guest image (and kernel) into the shared cache, through a
# throwaway daemon. Usage: prepare-image.sh BIN_DIR
set -euo pipefail
bin=$(realpath "${1:?usage: prepare-image.sh BIN_DIR}")
# The agent is linked statically, built for its own target (Makefile: agent).
agent=$(dirname "$bin")/x86_64-unknown-linux-gnu/$(basename "$bin")/burrow-agent
state=$(mktemp -d /tmp/burrow-prepare.XXXXXX)
trap '"$bin/burrow" --state-dir "$state" daemon stop >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
BURROWD="$bin/burrowd" BURROW_AGENT="$agent" "$bin/burrow" --state-dir "$state" image build debian
