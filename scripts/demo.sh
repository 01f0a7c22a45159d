#!/usr/bin/env bash
# What `make run` shows: boot a workspace, run commands in it, destroy it.
# Usage: demo.sh BIN_DIR. Uses its own state dir so it never touches other workspaces.
set -euo pipefail
bin=$(realpath "${1:?usage: demo.sh BIN_DIR}")
# The agent is linked statically, built for its own target (Makefile: agent).
agent=$(dirname "$bin")/x86_64-unknown-linux-gnu/$(basename "$bin")/burrow-agent
export BURROWD="$bin/burrowd" BURROW_AGENT="$agent"
own_state=
if [ -z "${BURROW_STATE_DIR:-}" ]; then
  BURROW_STATE_DIR=$(mktemp -d /tmp/burrow-demo.XXXXXX)
  own_state=$BURROW_STATE_DIR
fi
export BURROW_STATE_DIR
burrow() { "$bin/burrow" "$@"; }
name=demo-$$
cleanup() {
  burrow destroy "$name" >/dev/null 2>&1 || true
  burrow daemon stop >/dev/null 2>&1 || true
  [ -z "$own_state" ] || rm -rf "$own_state"
}
trap cleanup EXIT

set -x
burrow create --name "$name"
burrow exec "$name" -- uname -a
burrow exec "$name" -- sh -c 'cat /etc/os-release | head -n 2; python3 --version; git --version'
echo 'print("hello from the workspace")' | burrow file write "$name" /work/hello.py
burrow exec "$name" --workdir /work -- python3 hello.py
burrow info "$name"
burrow destroy "$name"
