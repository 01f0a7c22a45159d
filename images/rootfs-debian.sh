#!/bin/bash
# burrow: build the Debian base root file system for workspaces.
#
# Usage: rootfs-debian.sh CACHE_DIR
#
# Output (complete when manifest.json exists; the whole directory appears by one rename):
#   CACHE_DIR/images/debian/rootfs/         debootstrap of bookworm (minbase) + git ca-certificates
#                                           curl python3 procps iproute2, security updates applied
#   CACHE_DIR/images/debian/manifest.json   {"name","suite","built_at","size_bytes","packages"}
#
# Self-contained (the runtime embeds it with include_str! and runs it with `bash -s -- ARGS`).
# Needs root. Installs debootstrap with apt-get if missing. Idempotent: does nothing when the
# image is already complete. Progress goes to stderr as "image: ..." lines; on failure the
# last line is "image: error: <reason>" and the exit status is non-zero.
set -euo pipefail

SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
PACKAGES=git,ca-certificates,curl,python3,procps,iproute2

log() { echo "image: $*" >&2; }
die() { echo "image: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: rootfs-debian.sh CACHE_DIR"
[ -n "$1" ] || die "CACHE_DIR is empty"
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap needs it)"

CACHE=$(realpath -m -- "$1")
PARENT=$CACHE/images
OUT=$PARENT/debian

if [ -f "$OUT/manifest.json" ] && [ -d "$OUT/rootfs" ]; then
  log "debian rootfs already built at $OUT"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() { # apt_install PKG...: install with apt-get, refreshing the lists once if needed
  log "installing $* with apt-get"
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 && return 0
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || die "apt-get install $* failed"
}
command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
command -v flock >/dev/null 2>&1 || apt_install util-linux

mkdir -p "$PARENT" || die "cannot create $PARENT"

# One build at a time per cache dir; a second caller waits, then finds the image complete.
exec 9>"$PARENT/.debian.lock" || die "cannot open lock file in $PARENT"
flock 9 || die "cannot lock $PARENT/.debian.lock"
if [ -f "$OUT/manifest.json" ] && [ -d "$OUT/rootfs" ]; then
  log "debian rootfs already built at $OUT"
  exit 0
fi

# Remove a directory tree safely: first unmount anything below it (a killed debootstrap can
# leave proc/sys/dev mounted inside its target), then never cross into another file system.
unmount_below() {
  local dir=$1 m
  # mountinfo field 5 is the mount point (octal escapes for spaces are not expected here).
  for m in $(awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}
safe_rm() {
  local dir=$1
  [ -e "$dir" ] || return 0
  unmount_below "$dir"
  rm -rf --one-file-system -- "$dir"
}

# Leftovers of crashed builds (we hold the lock, so none is in use) and an incomplete output.
for d in "$PARENT"/.debian.tmp.*; do
  [ -e "$d" ] || continue
  log "removing leftover $d"
  safe_rm "$d"
done
if [ -e "$OUT" ]; then
  log "removing incomplete $OUT"
  safe_rm "$OUT"
fi

TMP=$(mktemp -d "$PARENT/.debian.tmp.XXXXXX") || die "cannot create a temp dir in $PARENT"
chmod 0755 "$TMP"
ROOT=$TMP/rootfs
cleanup() {
  local rc=$?
  if [ -n "${TMP:-}" ] && [ -e "$TMP" ]; then
    safe_rm "$TMP"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)
log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR into $ROOT"
if ! debootstrap --variant=minbase --include="$PACKAGES" --components=main \
       "$SUITE" "$ROOT" "$MIRROR" >"$TMP/debootstrap.log" 2>&1; then
  tail -n 5 "$TMP/debootstrap.log" | sed 's/^/image:   /' >&2 || true
  reason=$(grep -E '^(E|W): ' "$TMP/debootstrap.log" | tail -n 1 || true)
  die "debootstrap failed${reason:+: $reason}"
fi
log "debootstrap done after $(( $(date +%s) - start )) s"

# Apt sources for the guest: the release, its updates and security updates.
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF

# Apply pending updates (security fixes for git, curl, openssl...). Services must not start.
log "applying $SUITE-updates and $SUITE-security"
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true # build-time only, replaced below
mount -t proc proc "$ROOT/proc" || die "cannot mount proc in $ROOT"
upgrade_ok=1
chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -q && apt-get -y -q -o Dpkg::Options::=--force-confold dist-upgrade' \
  >"$TMP/upgrade.log" 2>&1 || upgrade_ok=0
umount "$ROOT/proc" || umount -l "$ROOT/proc" || die "cannot unmount $ROOT/proc"
if [ $upgrade_ok -ne 1 ]; then
  tail -n 5 "$TMP/upgrade.log" | sed 's/^/image:   /' >&2 || true
  die "apt-get dist-upgrade in the rootfs failed"
fi
rm -f "$ROOT/usr/sbin/policy-rc.d"

log "tidying the rootfs"
# Apt caches and lists (a guest runs `apt-get update` first, as in container images).
rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/cache/apt/archives/partial/* \
       "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/debconf/*-old \
       "$ROOT"/var/lib/dpkg/*-old "$ROOT"/var/log/apt/* "$ROOT"/var/log/dpkg.log \
       "$ROOT"/var/log/bootstrap.log "$ROOT"/var/log/alternatives.log
mkdir -p "$ROOT/var/lib/apt/lists/partial"
# Never ship the build host's DNS configuration; the agent writes the guest's at boot.
rm -f "$ROOT/etc/resolv.conf"
cat >"$ROOT/etc/resolv.conf" <<'EOF'
# burrow: placeholder. The guest agent writes the workspace's resolver configuration here.
EOF
echo burrow >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	burrow
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
# Empty machine-id: each workspace gets its own (systemd-style "uninitialized" state).
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id"
# Users' files live in /work; /run and /tmp exist (the initramfs mounts a tmpfs on /run).
install -d -m 0755 "$ROOT/work"
install -d -m 0755 "$ROOT/run"
install -d -m 1777 "$ROOT/tmp"
install -d -m 0755 "$ROOT/dev" "$ROOT/proc" "$ROOT/sys"
find "$ROOT/run" "$ROOT/tmp" -mindepth 1 -delete 2>/dev/null || true

# Nothing may still be mounted inside before the rootfs is published.
if awk -v d="$ROOT" 'index($5, d "/") == 1 {f=1} END {exit !f}' /proc/self/mountinfo; then
  die "something is still mounted below $ROOT"
fi

size=$(du -sx -B1 "$ROOT" | cut -f1)
npkgs=$(dpkg-query --admindir="$ROOT/var/lib/dpkg" -W -f='${db:Status-Abbrev}\n' | grep -c '^ii' || true)
[ "${npkgs:-0}" -gt 0 ] || die "no installed packages found in the rootfs"
built_at=$(date +%s)
# The manifest is written last, then the whole directory is published by one rename.
printf '{"name":"debian","suite":"%s","built_at":%s,"size_bytes":%s,"packages":%s}\n' \
  "$SUITE" "$built_at" "$size" "$npkgs" >"$TMP/manifest.json.part"
rm -f "$TMP/debootstrap.log" "$TMP/upgrade.log"
sync -f "$TMP/manifest.json.part" 2>/dev/null || true
mv -f "$TMP/manifest.json.part" "$TMP/manifest.json"
mv -T "$TMP" "$OUT" || die "cannot rename $TMP to $OUT"
TMP=
sync -f "$OUT" 2>/dev/null || true
log "debian rootfs ready at $OUT: $((size / 1048576)) MiB, $npkgs packages, built in $(( $(date +%s) - start )) s"
