#!/usr/bin/env bash
# Boots the Hive guest (kernel + cell rootfs disk + build image disk) under
#   qemu-system-x86_64 -M microvm -accel tcg
# and checks the cell daemon comes up as init, answers its health check, and runs one build
# step in its build container. This is the CI proof of the microVM guest image: the KVM on the
# development machines cannot boot Linux (DESIGN.md), TCG can.
#
# How the host reaches the agent: production uses vsock, but QEMU's host side of vsock needs
# /dev/vhost-vsock, which these hosts lack. So for this check the cell daemon listens on TCP in
# the guest (hive.listen=tcp:0.0.0.0:1024 on the kernel command line), the guest NIC is QEMU
# user-mode networking (restrict=on: no way out) with a hostfwd from 127.0.0.1:<free port>, and
# the client is `hive-cell probe`.
#
# The disks are attached read-only (the cache files are shared): the cell daemon mounts tmpfs
# for everything it writes. Disk order is fixed: /dev/vda = cell rootfs, /dev/vdb = build image,
# and `hive.build_disk=/dev/vdb` asks the cell daemon to mount the latter at /images/build.
#
# Interim fallback, said loudly when used: a cell daemon that does not know hive.build_disk=
# (checked by looking for that word in its binary) would find /images/build empty. Then this
# check builds a one-off root disk with the build image tree placed at /images/build
# (--cell-rootfs-dir + --build-image-dir, hard-linked, mkfs.ext4 -d), so the kernel, the
# daemon and the build container are still proved. Remove once hive-cell mounts the disk.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
kernel=""
rootfs_disk=""
build_disk=""
rootfs_dir="${HIVE_CELL_ROOTFS:-}"
build_dir="${HIVE_BUILD_IMAGE:-}"
cell_binary="$repo/target/x86_64-unknown-linux-gnu/release/hive-cell"
timeout_secs=180
memory_mib=512
step_cmd="echo hive-boot-check-ok; id -u"
expect="hive-boot-check-ok"
keep_log=""

usage() {
  cat <<USAGE
Usage: $(basename "$0") --kernel VMLINUX --rootfs-disk IMG --build-disk IMG [options]

Boot the Hive guest under QEMU microvm (TCG) and check the cell daemon: health, then one build
step ("$step_cmd") whose output must contain "$expect".

Required (defaults come from the env a build-images.sh/build-kernel.sh run exports):
  --kernel PATH        guest vmlinux (PVH ELF)       [env: \$HIVE_GUEST_KERNEL/vmlinux]
  --rootfs-disk PATH   cell rootfs ext4 (/dev/vda)   [env: HIVE_CELL_ROOTFS_DISK]
  --build-disk PATH    build image ext4 (/dev/vdb)   [env: HIVE_BUILD_IMAGE_DISK]
Only for the interim fallback (a hive-cell without hive.build_disk= support):
  --cell-rootfs-dir D  cell rootfs directory         [env: HIVE_CELL_ROOTFS]
  --build-image-dir D  build image directory         [env: HIVE_BUILD_IMAGE]
Options:
  --cell-binary PATH   hive-cell on the host, used as the probe client
                       (default $cell_binary)
  --timeout SECS       overall deadline for boot + step (default $timeout_secs)
  --memory MIB         guest memory (default $memory_mib)
  --serial-log PATH    keep the guest serial console here (default: a temp file, shown on failure)
  -h, --help           this text

Prints timings: QEMU start -> first serial byte, -> init exec'd, -> health answered, -> step done.
Exit 0 only when the step succeeded and printed the expected text.
USAGE
}

die() { echo "boot-check: error: $*" >&2; exit 1; }
log() { echo "boot-check: $*" >&2; }

[ -n "${HIVE_GUEST_KERNEL:-}" ] && kernel="$HIVE_GUEST_KERNEL/vmlinux"
rootfs_disk="${HIVE_CELL_ROOTFS_DISK:-}"
build_disk="${HIVE_BUILD_IMAGE_DISK:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --kernel) [ $# -ge 2 ] || die "--kernel needs a path"; kernel="$2"; shift ;;
    --rootfs-disk) [ $# -ge 2 ] || die "--rootfs-disk needs a path"; rootfs_disk="$2"; shift ;;
    --build-disk) [ $# -ge 2 ] || die "--build-disk needs a path"; build_disk="$2"; shift ;;
    --cell-rootfs-dir) [ $# -ge 2 ] || die "--cell-rootfs-dir needs a path"; rootfs_dir="$2"; shift ;;
    --build-image-dir) [ $# -ge 2 ] || die "--build-image-dir needs a path"; build_dir="$2"; shift ;;
    --cell-binary) [ $# -ge 2 ] || die "--cell-binary needs a path"; cell_binary="$2"; shift ;;
    --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs="$2"; shift ;;
    --memory) [ $# -ge 2 ] || die "--memory needs MiB"; memory_mib="$2"; shift ;;
    --serial-log) [ $# -ge 2 ] || die "--serial-log needs a path"; keep_log="$2"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ -n "$kernel" ] || die "--kernel is required (or set HIVE_GUEST_KERNEL)"
[ -n "$rootfs_disk" ] || die "--rootfs-disk is required (or set HIVE_CELL_ROOTFS_DISK)"
[ -n "$build_disk" ] || die "--build-disk is required (or set HIVE_BUILD_IMAGE_DISK)"
for f in "$kernel" "$rootfs_disk" "$build_disk"; do
  [ -f "$f" ] || die "$f does not exist"
done
[ -x "$cell_binary" ] || die "probe client $cell_binary is missing or not executable (build-images.sh builds it)"
[[ "$timeout_secs" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive integer, got '$timeout_secs'"
[[ "$memory_mib" =~ ^[1-9][0-9]*$ ]] || die "--memory must be a positive integer, got '$memory_mib'"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
command -v python3 >/dev/null || die "python3 not found (needed to pick a free port)"

work="$(mktemp -d /tmp/hive-boot-check.XXXXXX)"
staging=""
serial="${keep_log:-$work/serial.log}"
: >"$serial"
qemu_pid=""
watcher_pid=""
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  [ -z "$staging" ] || rm -rf "$staging"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The daemon that will boot is the one inside the root disk; its tree is --cell-rootfs-dir
# when given, else the probe binary (same build) stands in for it.
daemon_bin="$cell_binary"
[ -n "$rootfs_dir" ] && [ -f "$rootfs_dir/sbin/hive-cell" ] && daemon_bin="$rootfs_dir/sbin/hive-cell"
if ! grep -qa 'hive.build_disk=' "$daemon_bin"; then
  log "WARNING: $daemon_bin does not know hive.build_disk=; it would not mount the build disk."
  log "WARNING: interim fallback: booting a one-off root disk with the build image at /images/build."
  [ -d "${rootfs_dir:-/nonexistent}" ] || die "fallback needs --cell-rootfs-dir (or HIVE_CELL_ROOTFS)"
  [ -d "${build_dir:-/nonexistent}" ] || die "fallback needs --build-image-dir (or HIVE_BUILD_IMAGE)"
  command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
  # Next to the images so the tree can be hard-linked instead of copied.
  staging="$(mktemp -d "$(dirname "$(dirname "$rootfs_dir")")/.boot-check.XXXXXX")"
  cp -al "$rootfs_dir" "$staging/rootfs"
  rmdir "$staging/rootfs/images/build"
  cp -al "$build_dir" "$staging/rootfs/images/build"
  size_mib=$(( $(du -sk --apparent-size "$staging/rootfs" | cut -f1) * 5 / 4 / 1024 + 64 ))
  truncate -s "${size_mib}M" "$staging/root.ext4"
  mkfs.ext4 -q -F -E root_owner=0:0 -d "$staging/rootfs" "$staging/root.ext4" >&2 \
    || die "mkfs.ext4 of the fallback root disk failed"
  rootfs_disk="$staging/root.ext4"
fi

# A free loopback port for the hostfwd. The tiny race (someone else binding it before QEMU does)
# shows up as a QEMU start failure with a clear message, not as a wrong result.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

cmdline="console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 rootwait init=/sbin/hive-cell"
cmdline+=" ip=10.0.2.15::10.0.2.2:255.255.255.0:cell:eth0:off"
cmdline+=" hive.cell_id=qemu-check hive.listen=tcp:0.0.0.0:1024 hive.build_disk=/dev/vdb"
# The kernel starts init with no PATH; words it does not know become init's environment.
cmdline+=" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

now_ms() { date +%s%3N; }
t0=$(now_ms)
log "booting $(basename "$kernel") under QEMU microvm/TCG, agent forwarded to 127.0.0.1:$port"
qemu-system-x86_64 \
  -M microvm,acpi=off -accel tcg -cpu max -smp 1 -m "$memory_mib" \
  -nodefaults -no-user-config -nographic -no-reboot \
  -serial "file:$serial" \
  -kernel "$kernel" -append "$cmdline" \
  -drive "id=rootfs,file=$rootfs_disk,format=raw,if=none,readonly=on" \
  -device virtio-blk-device,drive=rootfs \
  -drive "id=build,file=$build_disk,format=raw,if=none,readonly=on" \
  -device virtio-blk-device,drive=build \
  -netdev "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:$port-10.0.2.15:1024" \
  -device virtio-net-device,netdev=net0 \
  -device virtio-rng-device \
  >"$work/qemu.out" 2>&1 &
qemu_pid=$!

deadline=$(( t0 + timeout_secs * 1000 ))
t_health=""
# Boot milestones are read off the serial log by a watcher at 20 ms resolution, independent of
# how long each probe attempt below takes.
(
  fb="" init="" ready=""
  while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ -z "$fb" ] && [ -s "$serial" ]; then fb=$(now_ms); echo "$fb" >"$work/t_first_byte"; fi
    if [ -z "$init" ] && grep -q "Run /sbin/hive-cell as init process" "$serial"; then
      init=$(now_ms); echo "$init" >"$work/t_init"
    fi
    if [ -z "$ready" ] && grep -q "cell daemon ready" "$serial"; then
      ready=$(now_ms); echo "$ready" >"$work/t_ready"
    fi
    if [ -z "$fb" ] || [ -z "$init" ] || [ -z "$ready" ]; then sleep 0.02; else break; fi
  done
) &
watcher_pid=$!
fail() {
  log "FAILED: $*"
  log "--- QEMU output ---"; cat "$work/qemu.out" >&2 || true
  log "--- guest serial console (last 60 lines of $serial) ---"; tail -n 60 "$serial" >&2 || true
  exit 1
}
alive() { kill -0 "$qemu_pid" 2>/dev/null; }

# Phase 1: the daemon answers health (probe without a step). Probing before the guest listens
# would park the connection in slirp's SYN retransmit back-off (seconds), so first wait for the
# daemon's "ready" log line on the console (or 30 s, in case its wording changes), then poll
# with each attempt bounded.
ready_wait_until=$(( $(now_ms) + 30000 ))
while [ ! -s "$work/t_ready" ] && [ "$(now_ms)" -lt "$ready_wait_until" ] && [ "$(now_ms)" -lt "$deadline" ]; do
  alive || fail "QEMU exited (guest panic or power-off) before the cell daemon started"
  sleep 0.02
done
while :; do
  [ "$(now_ms)" -lt "$deadline" ] || fail "no health answer within ${timeout_secs}s"
  alive || fail "QEMU exited (guest panic or power-off) before the cell daemon answered"
  if timeout 5 "$cell_binary" probe --connect "tcp:127.0.0.1:$port" >"$work/health.out" 2>&1; then
    t_health=$(now_ms)
    break
  fi
  sleep 0.1
done
log "health answered: $(tr '\n' ' ' <"$work/health.out")"

# Phase 2: one build step in the build container (empty repo_url: no clone, no route out here).
remaining=$(( (deadline - $(now_ms)) / 1000 ))
[ "$remaining" -gt 0 ] || fail "no time left for the build step"
if ! timeout "$remaining" "$cell_binary" probe --connect "tcp:127.0.0.1:$port" \
    --run-step "$step_cmd" >"$work/step.out" 2>&1; then
  cat "$work/step.out" >&2
  fail "the build step did not succeed"
fi
t_step=$(now_ms)
grep -q "$expect" "$work/step.out" || { cat "$work/step.out" >&2; fail "step output lacks '$expect'"; }
grep -qx '1000' "$work/step.out" || { cat "$work/step.out" >&2; fail "step did not run as uid 1000"; }

log "build step output:"
sed 's/^/  | /' "$work/step.out" >&2
wait "$watcher_pid" 2>/dev/null || true
since() { if [ -s "$1" ]; then echo "$(( $(cat "$1") - t0 )) ms"; else echo "not seen"; fi; }
echo "boot-check: PASS kernel=$kernel"
echo "boot-check: qemu start -> first serial byte: $(since "$work/t_first_byte")"
echo "boot-check: qemu start -> init exec'd:       $(since "$work/t_init")"
echo "boot-check: qemu start -> daemon logs ready: $(since "$work/t_ready")"
echo "boot-check: qemu start -> health answered:   $(( t_health - t0 )) ms"
echo "boot-check: qemu start -> step finished:     $(( t_step - t0 )) ms"
