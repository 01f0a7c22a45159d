#!/bin/bash
# burrow: build the guest initramfs.
#
# Usage: initramfs.sh CACHE_DIR AGENT_BINARY OUTPUT_PATH
#
# Reads CACHE_DIR/kernel/{version,modules/} (built by kernel.sh) and writes OUTPUT_PATH, a
# newc cpio (not compressed) with:
#   /bin/busybox (static) + applet links, /lib/modules/<kver>/ (modules + modules.dep),
#   /burrow-agent (AGENT_BINARY), /init.
# /init loads virtio_mmio, virtiofs and vmw_vsock_virtio_transport with modprobe (order from
# modules.dep), then, by `burrow.mode=`:
#   workspace (the default): mounts the virtio-fs tag given by `burrow.root=` (default: rootfs)
#     on /newroot and a tmpfs on /newroot/run;
#   container: a VM with no workspace image, for OCI containers (docs/oci.md): /newroot is a
#     tmpfs of at most `burrow.rootsize=` (default 25% of RAM) holding /proc /sys /dev /run
#     /tmp, and the virtio-fs tag `shared` (the containers' directory) is mounted on
#     /newroot/run/burrow/shared;
# then copies the agent to /newroot/run/burrow-agent, moves /dev and switches root to
# /run/burrow-agent. On failure it prints one console line "BURROW-INIT-FAILED: <reason>"
# and calls `reboot -f` (with QEMU's -no-reboot the VM exits).
#
# The agent must be linked statically (a container VM has no libraries to offer it):
# RUSTFLAGS='-C target-feature=+crt-static' cargo build -p burrow-agent --target x86_64-unknown-linux-gnu
#
# Self-contained (the runtime embeds it with include_str! and runs it with `bash -s -- ARGS`).
# Installs busybox-static and cpio with apt-get if missing; downloads nothing otherwise.
# Always rebuilds (about a second); OUTPUT_PATH is replaced atomically by a rename.
# Progress goes to stderr as "image: ..." lines; on failure the last line is
# "image: error: <reason>" and the exit status is non-zero.
set -euo pipefail

log() { echo "image: $*" >&2; }
die() { echo "image: error: $*" >&2; exit 1; }

[ $# -eq 3 ] || die "usage: initramfs.sh CACHE_DIR AGENT_BINARY OUTPUT_PATH"
CACHE=$1 AGENT=$2 OUTPUT=$3
[ -n "$CACHE" ] || die "CACHE_DIR is empty"
[ -n "$OUTPUT" ] || die "OUTPUT_PATH is empty"
[ -f "$AGENT" ] || die "agent binary $AGENT does not exist or is not a file"
# The kernel can only exec an ELF file or a #! script; a failed exec of PID 1 is a panic.
case $(head -c 4 "$AGENT" | od -An -tx1 | tr -d ' \n') in
  7f454c46) ;;
  2321*) ;;
  *) die "agent binary $AGENT is neither an ELF executable nor a #! script" ;;
esac
[ -s "$CACHE/kernel/version" ] || die "no kernel bundle in $CACHE/kernel (run kernel.sh first)"
KVER=$(cat "$CACHE/kernel/version")
MODS=$CACHE/kernel/modules/lib/modules/$KVER
[ -s "$MODS/modules.dep" ] || die "no modules.dep in $MODS (run kernel.sh first)"

export DEBIAN_FRONTEND=noninteractive
apt_install() { # apt_install PKG...: install with apt-get, refreshing the lists once if needed
  log "installing $* with apt-get"
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 && return 0
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || die "apt-get install $* failed"
}
BUSYBOX=/bin/busybox
static_busybox() { [ -x "$1" ] && ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
if ! static_busybox "$BUSYBOX"; then
  if [ -x /usr/bin/busybox ] && static_busybox /usr/bin/busybox; then
    BUSYBOX=/usr/bin/busybox
  else
    apt_install busybox-static
    static_busybox "$BUSYBOX" || die "no static busybox at $BUSYBOX after installing busybox-static"
  fi
fi
command -v cpio >/dev/null 2>&1 || apt_install cpio
APPLETS=$("$BUSYBOX" --list) || die "$BUSYBOX --list failed"
for a in sh mount umount modprobe switch_root reboot sleep mkdir cp chmod hostname ip rm; do
  [[ $'\n'$APPLETS$'\n' == *$'\n'$a$'\n'* ]] || die "busybox at $BUSYBOX lacks the $a applet"
done

OUTDIR=$(dirname -- "$OUTPUT")
mkdir -p "$OUTDIR" || die "cannot create $OUTDIR"
TMP=$(mktemp -d "$OUTDIR/.initramfs.tmp.XXXXXX") || die "cannot create a temp dir in $OUTDIR"
trap 'rm -rf --one-file-system -- "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

R=$TMP/root
mkdir -p "$R"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
for a in $APPLETS; do
  [ "$a" = busybox ] || ln -s busybox "$R/bin/$a"
done
ln -s bin "$R/sbin"
# The kernel's built-in initramfs already has /dev/console; ship one too where we may mknod.
mknod -m 0600 "$R/dev/console" c 5 1 2>/dev/null || true
cp -a "$MODS" "$R/lib/modules/$KVER" || die "cannot copy modules from $MODS"
# A dynamically linked ELF names its loader in a PT_INTERP segment (p_type 3); a
# static(-pie) one has none. ELF64, little-endian: e_phoff at 32, e_phentsize at 54,
# e_phnum at 56.
has_interp() {
  local phoff phentsize phnum i t
  phoff=$(od -An -tu8 -j32 -N8 "$1" | tr -d ' ')
  phentsize=$(od -An -tu2 -j54 -N2 "$1" | tr -d ' ')
  phnum=$(od -An -tu2 -j56 -N2 "$1" | tr -d ' ')
  for ((i = 0; i < phnum; i++)); do
    t=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$1" | tr -d ' ')
    [ "$t" != 3 ] || return 0
  done
  return 1
}
if head -c 4 "$AGENT" | grep -q ELF && has_interp "$AGENT"; then
  die "agent binary $AGENT is dynamically linked; build it static: RUSTFLAGS='-C target-feature=+crt-static' cargo build -p burrow-agent --target x86_64-unknown-linux-gnu"
fi
cp "$AGENT" "$R/burrow-agent" || die "cannot copy $AGENT"
chmod 0755 "$R/burrow-agent"
# Symbols and debug info are of no use in the guest and cost boot time: the kernel
# unpacks every byte of the initramfs (a debug build of the agent is ~50 MB).
if command -v strip >/dev/null 2>&1 && head -c 4 "$R/burrow-agent" | grep -q ELF; then
  strip -s "$R/burrow-agent" || die "strip of the agent failed"
fi

cat >"$R/init" <<'EOF'
#!/bin/sh
# burrow initramfs init: mount the workspace's virtio-fs root and hand over to the agent.
export PATH=/bin
fail() {
	echo "BURROW-INIT-FAILED: $*" >/dev/console 2>/dev/null || echo "BURROW-INIT-FAILED: $*"
	# Let the UART drain the line before the reset (output is lost otherwise).
	sleep 0.2
	reboot -f
	exit 1
}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sys /sys || fail "mount /sys"
mount -t devtmpfs dev /dev || fail "mount /dev"

root=rootfs
mode=workspace
rootsize=25%
host=
addr=
gw=
read -r cmdline </proc/cmdline || fail "read /proc/cmdline"
for arg in $cmdline; do
	case $arg in
	burrow.root=*) root=${arg#burrow.root=} ;;
	burrow.mode=*) mode=${arg#burrow.mode=} ;;
	burrow.rootsize=*) rootsize=${arg#burrow.rootsize=} ;;
	burrow.hostname=*) host=${arg#burrow.hostname=} ;;
	burrow.ip=*) addr=${arg#burrow.ip=} ;;
	burrow.gw=*) gw=${arg#burrow.gw=} ;;
	burrow.floor=1)
		# The benchmark's floor: the time from QEMU's start to this /init running.
		echo "BURROW-FLOOR $(cat /proc/uptime)" >/dev/console
		reboot -f
		;;
	esac
done
[ -n "$root" ] || fail "empty burrow.root"
[ -z "$host" ] || hostname "$host" || fail "hostname $host"

modprobe -a virtio_mmio virtiofs vmw_vsock_virtio_transport || fail "modprobe virtio_mmio virtiofs vmw_vsock_virtio_transport"

# The workspace's network interface (a TAP on burrow-netd's bridge), when it has one.
if [ -n "$addr" ]; then
	modprobe virtio_net || fail "modprobe virtio_net"
	ip link set eth0 up || fail "ip link set eth0 up"
	ip addr add "$addr" dev eth0 || fail "ip addr add $addr dev eth0"
	[ -z "$gw" ] || ip route add default via "$gw" || fail "ip route add default via $gw"
fi

# The virtio-fs tag is usable a moment after the driver binds: retry for up to ~2 s.
now_cs() { read -r up _ </proc/uptime; c=${up#*.}; now=$((${up%.*} * 100 + ${c#0})); }
mount_virtiofs() { # mount_virtiofs TAG DIR
	now_cs
	deadline=$((now + 200))
	until mount -t virtiofs "$1" "$2" 2>/dev/null; do
		now_cs
		[ "$now" -lt "$deadline" ] || fail "mount virtio-fs tag '$1' on $2"
		sleep 0.01
	done
}

case $mode in
workspace)
	mount_virtiofs "$root" /newroot
	[ -d /newroot/run ] || mkdir /newroot/run || fail "mkdir /newroot/run"
	mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount tmpfs on /newroot/run"
	;;
container)
	# No workspace image: the root is memory, bounded; containers' root file
	# systems and mounts come from the host through the shared directory.
	mount -t tmpfs -o "mode=0755,size=$rootsize" tmpfs /newroot || fail "mount tmpfs (size=$rootsize) on /newroot"
	mkdir -p /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/etc /newroot/run/burrow/shared ||
		fail "mkdir in /newroot"
	chmod 1777 /newroot/tmp || fail "chmod /newroot/tmp"
	mount_virtiofs shared /newroot/run/burrow/shared
	;;
*) fail "unknown burrow.mode=$mode (workspace or container)" ;;
esac
# The gateway answers DNS (burrow-netd forwards the queries of workspaces allowed
# out), so the resolver never changes with the policy.
if [ -n "$gw" ]; then
	[ -L /newroot/etc/resolv.conf ] && rm -f /newroot/etc/resolv.conf
	echo "nameserver $gw" >/newroot/etc/resolv.conf || fail "write /etc/resolv.conf"
fi
cp /burrow-agent /newroot/run/burrow-agent || fail "copy agent to /newroot/run"
chmod 0755 /newroot/run/burrow-agent || fail "chmod agent"
[ -d /newroot/dev ] || mkdir /newroot/dev || fail "mkdir /newroot/dev"
mount --move /dev /newroot/dev || fail "move /dev to /newroot/dev"
umount /sys || fail "umount /sys"
umount /proc || fail "umount /proc"
exec switch_root /newroot /run/burrow-agent
EOF
chmod 0755 "$R/init"
"$R/bin/busybox" sh -n "$R/init" || die "internal error: /init has a syntax error"

# Not compressed: under TCG the kernel's gunzip of the initramfs takes longer than
# QEMU's load of the larger file from the page cache.
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$TMP/initramfs.cpio" ||
  die "cpio of the initramfs failed"
[ -s "$TMP/initramfs.cpio" ] || die "empty initramfs"
mv -f "$TMP/initramfs.cpio" "$OUTPUT" || die "cannot rename the initramfs to $OUTPUT"
log "initramfs for $KVER at $OUTPUT ($(($(stat -c %s "$OUTPUT") / 1024)) KiB)"
