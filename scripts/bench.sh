#!/usr/bin/env bash
# Every benchmark burrow has, in one list, so that none can rot unseen.
#   scripts/bench.sh PROFILE          the full benchmark (make bench: PROFILE=release)
#   scripts/bench.sh PROFILE --smoke  one iteration of each, no targets asserted
#                                     (make test: PROFILE=debug)
# The binaries and examples must be built for PROFILE (target/PROFILE).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
mode=${2:-}
bin=target/$profile
step() { printf '\n== %s\n' "$*" >&2; "$@"; }
step python3 scripts/bench.py "$bin" $mode
step "$bin/examples/store_bench" $mode
step "$bin/examples/rule_bench" $mode
step python3 scripts/bench_volumes.py "$bin" --store btrfs $mode
step python3 scripts/bench_volumes.py "$bin" --store fuse $mode
step python3 scripts/bench_network.py "$bin" $mode
step python3 scripts/bench_streams.py "$bin" $mode
step python3 scripts/bench_oci.py "$bin" $mode
step python3 scripts/bench_shim.py "$bin" $mode
