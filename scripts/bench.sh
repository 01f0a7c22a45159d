#!/usr/bin/env bash
# Runs the benchmark against the binaries in BIN_DIR (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bench.py "${1:-target/release}" "${@:2}"
