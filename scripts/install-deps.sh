#!/usr/bin/env bash
# Installs what burrow needs on a Debian 12 host, and nothing that is already there.
# Idempotent: a second run only checks.
set -euo pipefail

need() { command -v "$1" >/dev/null 2>&1; }
log() { printf 'install-deps: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root (apt-get, cargo install)"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

# QEMU >= 8.2 comes from bookworm-backports (vhost-user-fs migration, needed later by memory snapshots).
backports=/etc/apt/sources.list.d/burrow-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding bookworm-backports"
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > "$backports"
  rm -f /var/lib/apt/lists/.burrow-updated
fi

pkgs=(busybox-static cpio socat debootstrap libseccomp-dev libcap-ng-dev pkg-config
      iproute2 kmod zstd xz-utils python3 sqlite3 curl binutils
      btrfs-progs libbtrfsutil-dev libclang-dev clang
      fuse3 attr git
      tmux asciinema
      libnftnl-dev libmnl-dev nftables
      libc6-dev) # libc.a: the guest agent is linked statically
# The OCI runtime's tests and benchmark drive private dockerds (docker.io 20.10 brings
# dockerd, containerd and the docker client that BuildKit builds need); the agent's
# container tests take their bundles' config.json from `runc spec`.
pkgs+=(docker.io containerd runc)
# The containerd shim's CRI tests speak CRI's gRPC API (k8s-cri, whose build
# script compiles the CRI protos with protoc).
pkgs+=(protobuf-compiler)
# CNI's reference plugins (bridge, host-local, loopback in /usr/lib/cni): the CRI
# test of a pod whose network CNI makes.
pkgs+=(containernetworking-plugins)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_ok=0
if need qemu-system-x86_64; then
  v=$(qemu-system-x86_64 --version | awk 'NR==1{print $4}')
  [ "$(printf '%s\n8.2\n' "$v" | sort -V | head -n1)" = 8.2 ] && qemu_ok=1
fi

if [ ${#missing[@]} -gt 0 ] || [ $qemu_ok = 0 ]; then
  if [ ! -f /var/lib/apt/lists/.burrow-updated ]; then
    log "apt-get update"
    apt-get update -qq
    touch /var/lib/apt/lists/.burrow-updated
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    # No service starts during the install: burrow's tests start private dockerds
    # of their own; a system dockerd would set up docker0 and iptables rules.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e $policy ]; then
      printf '#!/bin/sh\nexit 101\n' > $policy && chmod 0755 $policy && made_policy=1
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
      { [ $made_policy = 0 ] || rm -f $policy; exit 1; }
    [ $made_policy = 0 ] || rm -f $policy
  fi
  if [ $qemu_ok = 0 ]; then
    log "installing qemu-system-x86 from bookworm-backports"
    apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  fi
fi

# The vhost-user back ends come from crates.io.
need vhost-device-vsock || { log "cargo install vhost-device-vsock"; cargo install -q --locked vhost-device-vsock; }
need virtiofsd || { log "cargo install virtiofsd"; cargo install -q --locked virtiofsd; }
need cargo-nextest || { log "cargo install cargo-nextest"; cargo install -q --locked cargo-nextest; }

# The FUSE store serves users who are not root through fusermount3, which opens
# /dev/fuse as the calling user: Debian's udev rule makes it 0666. A host without
# udev (a container) may have made it 0600.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  log "chmod 0666 /dev/fuse (as Debian's udev rule sets it)"
  chmod 0666 /dev/fuse
fi
# QEMU and vhost-device-vsock run as this unprivileged system user, each jailed
# (see docs/containment.md); group kvm gives it /dev/kvm where KVM works.
vmm_user=burrow-vmm
getent group kvm >/dev/null || { log "groupadd --system kvm"; groupadd --system kvm; }
if ! id -u "$vmm_user" >/dev/null 2>&1; then
  log "useradd --system $vmm_user (groups: kvm)"
  useradd --system --user-group --groups kvm --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin "$vmm_user"
elif ! id -nG "$vmm_user" | tr ' ' '\n' | grep -qx kvm; then
  log "usermod -aG kvm $vmm_user"
  usermod -aG kvm "$vmm_user"
fi
# Debian's udev rule makes /dev/kvm root:kvm 0660; a host without udev may not have.
if [ -c /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
  log "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm (as Debian's udev rule sets it)"
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi
log "ok"
