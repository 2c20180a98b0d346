#!/usr/bin/env bash
# An emulated KVM host ("L1") for machines whose own KVM cannot boot Linux guests (nested PVM,
# no VT-x/AMD-V): QEMU TCG with AMD SVM emulated (-cpu qemu64,+svm,+npt) boots Debian's cloud
# kernel; there `kvm-amd` loads with nested paging and /dev/kvm works, so `hive-box --backend
# microvm` runs real microVM cells on Hive's own VMM, slowly (TCG is 20-50x slower than
# hardware) but for real. Used by the `microvm_e2e_*` tests and `local-hive.sh --microvm`.
#
#   image   Debian 12 minbase root (iproute2, nftables, kmod, busybox, qemu for the boot bench)
#           + the cloud kernel's modules, an initramfs that mounts it, and the kernel itself.
#           Cached in $HIVE_CACHE/kvm-host/image-<key>/ (key: kernel package version, package
#           list, mirror, the recipe and the L1 init scripts).
#   assets  ext4 disk with the guest kernel and the cell rootfs / build image disks (cached by
#           their hashes), the L1's /dev/vdb, mounted at /hive/assets.
#   bin     ext4 disk with hive-box (cached by its hash), the L1's /dev/vdc, at /hive/bin.
#   boot    runs QEMU in the foreground: console to a file, a control shell (sh on ttyS1) on a
#           Unix socket, user networking (the host is 10.0.2.2 from L1; --hostfwd adds ports).
#
# Stdout of image/assets/bin is KEY=PATH lines (eval-able); progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${HIVE_CACHE:-/var/cache/hive}"
suite="bookworm"
mirror="${HIVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
kernel_meta="linux-image-cloud-amd64"
# What L1 needs: the box daemon's tools (ip, nft), busybox for init and the
# control shell, e2fsprogs/util-linux for mounts, QEMU for the boot benchmark against our VMM.
packages="iproute2,nftables,kmod,procps,psmisc,util-linux,e2fsprogs,busybox,qemu-system-x86"
initrd_modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk"

usage() {
  cat <<USAGE
Usage:
  $(basename "$0") image
  $(basename "$0") assets --guest-kernel VMLINUX --rootfs-disk IMG --build-disk IMG
  $(basename "$0") bin --box-binary PATH [--bench-binary PATH]
  $(basename "$0") boot --image DIR --assets IMG --bin IMG --ctl SOCK --console FILE
                        [--memory MIB] [--smp N] [--cgroup v1|v2] [--hostfwd SPEC]...
                        [--start SCRIPT]
  $(basename "$0") exec --ctl SOCK -- COMMAND...

An emulated KVM host (QEMU TCG, AMD SVM emulated, Debian's cloud kernel) in which /dev/kvm
works, so hive-box runs microVM cells on machines without VT-x/AMD-V.

  image    build (or reuse) the L1 kernel, initramfs and root disk; prints HIVE_KVM_HOST_IMAGE=DIR
  assets   build (or reuse) the disk carrying the guest kernel and cell disks (L1: /hive/assets:
           vmlinux, cell-rootfs.ext4, build-image.ext4); prints HIVE_KVM_HOST_ASSETS=FILE
  bin      build (or reuse) the disk carrying hive-box (L1: /hive/bin/hive-box) and, with
           --bench-binary, vmm-bench (/hive/bin/vmm-bench); prints HIVE_KVM_HOST_BIN=FILE
  boot     run L1 in the foreground until it powers off or is killed:
             --ctl SOCK      Unix socket of the control shell (sh on L1's ttyS1)
             --console FILE  L1's serial console (kernel and init messages)
             --memory MIB    L1 memory (default 4096)
             --smp N         L1 vCPUs (default 1: with 2, L1 hung under host load)
             --cgroup v1|v2  how L1 mounts cgroups (default v1)
             --hostfwd SPEC  QEMU user-net forward, e.g. tcp:127.0.0.1:8181-:8081 (repeatable)
             --start SCRIPT  shell script L1 runs once it is up (log: /var/log/start.log)
  exec     run COMMAND in L1's control shell, print its output, exit with its status

In L1 the host is 10.0.2.2 (QEMU user networking maps it to the host's 127.0.0.1), L1 itself
10.0.2.15. Environment: HIVE_CACHE (default /var/cache/hive), HIVE_DEBIAN_MIRROR.
Needs root, debootstrap, e2fsprogs, qemu-system-x86, apt (for the kernel package).
USAGE
}

die() { echo "kvm-host: error: $*" >&2; exit 1; }
log() { echo "kvm-host: $*" >&2; }
sha() { sha256sum | cut -c1-16; }

cmd="${1:-}"
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift
case "$cmd" in -h|--help|help) usage; exit 0 ;; esac

# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------
build_image() {
  local tmp="$1" kpkg="$2" kver="$3" start
  start=$(date +%s)
  log "downloading $kpkg=$kver"
  mkdir -p "$tmp/deb"
  (cd "$tmp/deb" && apt-get download -q "$kpkg=$kver" >/dev/null 2>&1) \
    || die "apt-get download $kpkg=$kver failed (run apt-get update?)"
  dpkg-deb -x "$tmp/deb/"*.deb "$tmp/kernel"
  log "debootstrap $suite minbase (+$packages) into $tmp/rootfs (a few minutes)"
  if ! debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/rootfs" "$mirror" \
      >"$tmp/debootstrap.log" 2>&1; then
    tail -n 30 "$tmp/debootstrap.log" >&2
    die "debootstrap failed; full log in $tmp/debootstrap.log"
  fi
  local release
  release="$(basename "$(ls -d "$tmp/kernel/lib/modules/"*)")"
  mkdir -p "$tmp/rootfs/lib/modules"
  cp -a "$tmp/kernel/lib/modules/$release" "$tmp/rootfs/lib/modules/"
  depmod -b "$tmp/rootfs" "$release"
  install -m 0755 "$here/l1-init" "$tmp/rootfs/sbin/hive-l1-init"
  install -d "$tmp/rootfs/etc/hive-l1" "$tmp/rootfs/hive/assets" "$tmp/rootfs/hive/bin"
  install -m 0755 "$here/l1-ctl" "$tmp/rootfs/etc/hive-l1/ctl"
  install -m 0755 "$here/l1-autostart" "$tmp/rootfs/etc/hive-l1/autostart"
  install -m 0644 "$here/inittab" "$tmp/rootfs/etc/inittab"
  echo l1 >"$tmp/rootfs/etc/hostname"
  : >"$tmp/rootfs/etc/resolv.conf"
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*

  # The initramfs: static busybox, the virtio disk modules, /init.
  local ir="$tmp/initramfs"
  mkdir -p "$ir/bin" "$ir/modules"
  cp /bin/busybox "$ir/bin/busybox"
  file -L "$ir/bin/busybox" | grep -q 'statically linked' \
    || die "/bin/busybox is not static (apt-get install busybox-static)"
  for m in $initrd_modules; do
    local ko
    ko="$(find "$tmp/rootfs/lib/modules/$release" -name "$m.ko" | head -n 1)"
    [ -n "$ko" ] || die "module $m.ko not in $kpkg"
    cp "$ko" "$ir/modules/"
  done
  install -m 0755 "$here/initramfs-init" "$ir/init"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp/initrd.img"
  cp "$tmp/kernel/boot/vmlinuz-$release" "$tmp/vmlinuz"

  local used_kib size_mib
  used_kib="$(du -sk --apparent-size "$tmp/rootfs" | cut -f1)"
  size_mib=$(( used_kib * 5 / 4 / 1024 + 128 ))
  truncate -s "${size_mib}M" "$tmp/root.ext4"
  mkfs.ext4 -q -F -L hive-l1 -E root_owner=0:0 -d "$tmp/rootfs" "$tmp/root.ext4" >&2 \
    || die "mkfs.ext4 of the L1 root failed"
  rm -rf "$tmp/rootfs" "$tmp/kernel" "$tmp/initramfs" "$tmp/deb" "$tmp/debootstrap.log"
  echo "$kpkg $kver ($release), debian $suite minbase +$packages, built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s" \
    >"$tmp/BUILD-INFO"
}

cmd_image() {
  [ $# -eq 0 ] || die "image takes no arguments (see --help)"
  [ "$(id -u)" = 0 ] || die "must run as root (debootstrap)"
  for t in debootstrap mkfs.ext4 cpio gzip apt-get dpkg-deb depmod file; do
    command -v "$t" >/dev/null || die "'$t' not found (deploy/install-deps.sh installs it)"
  done
  local kpkg kver key out
  kpkg="$(apt-cache depends "$kernel_meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
  [ -n "$kpkg" ] || die "apt knows no $kernel_meta (apt-get update?)"
  kver="$(apt-cache policy "$kpkg" | awk '/Candidate:/{print $2}')"
  [ -n "$kver" ] && [ "$kver" != "(none)" ] || die "no candidate version of $kpkg"
  key="$( { echo "$suite $mirror $packages $initrd_modules $kpkg=$kver"; declare -f build_image;
            cat "$here/l1-init" "$here/l1-ctl" "$here/l1-autostart" "$here/inittab" "$here/initramfs-init"; } | sha)"
  out="$cache/kvm-host/image-$key"
  mkdir -p "$cache/kvm-host"
  exec 9>"$cache/kvm-host/.lock"
  flock 9
  if [ -f "$out/root.ext4" ]; then
    log "L1 image cached: $out"
  else
    local tmp
    tmp="$(mktemp -d "$cache/kvm-host/.image-$key.XXXXXX")"
    build_image "$tmp" "$kpkg" "$kver"
    mv "$tmp" "$out"
    log "L1 image ready: $out ($(cat "$out/BUILD-INFO"))"
    prune image- "$out"
  fi
  echo "HIVE_KVM_HOST_IMAGE=$out"
}

# prune PREFIX KEEP: drop older cached entries of a kind, keeping the newest three and KEEP.
prune() {
  local prefix="$1" keep="$2"
  touch "$keep"
  find "$cache/kvm-host" -mindepth 1 -maxdepth 1 -name "$prefix*" -printf '%T@ %p\n' \
    | sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r old; do
        [ "$old" = "$keep" ] && continue
        log "pruning $old"
        rm -rf "$old"
      done
}

# ---------------------------------------------------------------------------------------------
# assets / bin: ext4 disks of files, cached by the files' hashes
# ---------------------------------------------------------------------------------------------
# make_files_disk KIND NAME=PATH...: an ext4 disk holding each PATH as NAME.
make_files_disk() {
  local kind="$1"; shift
  local spec key out tmp name path used_kib=0 size_mib
  key="$(for spec in "$@"; do
           name="${spec%%=*}"; path="${spec#*=}"
           [ -f "$path" ] || die "$path does not exist"
           echo "$name $(sha256sum <"$path" | cut -c1-32)"
         done | sha)"
  out="$cache/kvm-host/$kind-$key.ext4"
  mkdir -p "$cache/kvm-host"
  exec 9>"$cache/kvm-host/.lock"
  flock 9
  if [ -f "$out" ]; then
    log "$kind disk cached: $out"
  else
    tmp="$(mktemp -d "$cache/kvm-host/.$kind.XXXXXX")"
    mkdir "$tmp/files"
    for spec in "$@"; do
      name="${spec%%=*}"; path="${spec#*=}"
      # Hard link when on the same file system (no copy), else copy.
      ln "$path" "$tmp/files/$name" 2>/dev/null || cp "$path" "$tmp/files/$name"
      used_kib=$(( used_kib + $(du -k --apparent-size "$path" | cut -f1) ))
    done
    size_mib=$(( used_kib * 11 / 10 / 1024 + 32 ))
    truncate -s "${size_mib}M" "$tmp/disk.ext4"
    mkfs.ext4 -q -F -E root_owner=0:0 -d "$tmp/files" "$tmp/disk.ext4" >&2 \
      || die "mkfs.ext4 of the $kind disk failed"
    mv "$tmp/disk.ext4" "$out"
    rm -rf "$tmp"
    log "$kind disk ready (${size_mib} MiB): $out"
    prune "$kind-" "$out"
  fi
  echo "$out"
}

cmd_assets() {
  local kernel="" rootfs="" build=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --guest-kernel) [ $# -ge 2 ] || die "--guest-kernel needs a path"; kernel="$2"; shift ;;
      --rootfs-disk) [ $# -ge 2 ] || die "--rootfs-disk needs a path"; rootfs="$2"; shift ;;
      --build-disk) [ $# -ge 2 ] || die "--build-disk needs a path"; build="$2"; shift ;;
      *) die "assets: unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [ -d "$kernel" ] && kernel="$kernel/vmlinux"
  [ -n "$kernel" ] && [ -n "$rootfs" ] && [ -n "$build" ] \
    || die "assets needs --guest-kernel, --rootfs-disk and --build-disk (see --help)"
  echo "HIVE_KVM_HOST_ASSETS=$(make_files_disk assets vmlinux="$kernel" \
    cell-rootfs.ext4="$rootfs" build-image.ext4="$build")"
}

cmd_bin() {
  local box="" bench=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --box-binary) [ $# -ge 2 ] || die "--box-binary needs a path"; box="$2"; shift ;;
      --bench-binary) [ $# -ge 2 ] || die "--bench-binary needs a path"; bench="$2"; shift ;;
      *) die "bin: unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [ -n "$box" ] || die "bin needs --box-binary (see --help)"
  local -a files=(hive-box="$box")
  [ -n "$bench" ] && files+=(vmm-bench="$bench")
  echo "HIVE_KVM_HOST_BIN=$(make_files_disk bin "${files[@]}")"
}

# ---------------------------------------------------------------------------------------------
# boot
# ---------------------------------------------------------------------------------------------
cmd_boot() {
  local image="" assets="" bin="" ctl="" console="" memory=4096 smp=1 cgroup=v1 start=""
  local -a fwds=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --image) [ $# -ge 2 ] || die "--image needs a directory"; image="$2"; shift ;;
      --assets) [ $# -ge 2 ] || die "--assets needs a file"; assets="$2"; shift ;;
      --bin) [ $# -ge 2 ] || die "--bin needs a file"; bin="$2"; shift ;;
      --ctl) [ $# -ge 2 ] || die "--ctl needs a socket path"; ctl="$2"; shift ;;
      --console) [ $# -ge 2 ] || die "--console needs a file"; console="$2"; shift ;;
      --memory) [ $# -ge 2 ] || die "--memory needs MiB"; memory="$2"; shift ;;
      --smp) [ $# -ge 2 ] || die "--smp needs a number"; smp="$2"; shift ;;
      --cgroup) [ $# -ge 2 ] || die "--cgroup needs v1 or v2"; cgroup="$2"; shift ;;
      --hostfwd) [ $# -ge 2 ] || die "--hostfwd needs a spec"; fwds+=("$2"); shift ;;
      --start) [ $# -ge 2 ] || die "--start needs a script"; start="$2"; shift ;;
      *) die "boot: unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [ -n "$image" ] && [ -f "$image/root.ext4" ] || die "--image: no L1 image at '$image' ($0 image builds it)"
  [ -n "$assets" ] && [ -f "$assets" ] || die "--assets: no such disk '$assets' ($0 assets builds it)"
  [ -n "$bin" ] && [ -f "$bin" ] || die "--bin: no such disk '$bin' ($0 bin builds it)"
  [ -n "$ctl" ] || die "--ctl is required"
  [ -n "$console" ] || die "--console is required"
  [[ "$memory" =~ ^[1-9][0-9]*$ ]] || die "--memory must be a positive integer, got '$memory'"
  [[ "$smp" =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive integer, got '$smp'"
  case "$cgroup" in v1|v2) ;; *) die "--cgroup must be v1 or v2, got '$cgroup'" ;; esac
  [ -z "$start" ] || [ -f "$start" ] || die "--start: no such script '$start'"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
  local net="user,id=n0,net=10.0.2.0/24,host=10.0.2.2"
  local f
  for f in "${fwds[@]}"; do net+=",hostfwd=$f"; done
  local -a extra=()
  [ -n "$start" ] && extra+=(-fw_cfg "name=opt/hive/start,file=$start")
  rm -f "$ctl"
  # The disks are shared (cache files) and attached read-only; L1 keeps its writes in tmpfs.
  # Nested guests here are not flawless: now and then one triple-faults or stalls mid-boot,
  # with our VMM and with QEMU, and L1 itself once panicked ("corrupted stack end") while a
  # nested vCPU ran. L1 without transparent huge pages had fewer guest triple faults in
  # vmm-bench (0 of 9 against 3 of 12) but hung or lost its control shell in 3 of 9 other
  # microVM tests (none in the two full runs before), so THP stays on; the tests retry, and
  # the bench retries boots and counts them.
  # One vCPU by default (2026-12-06): with two (multi-threaded TCG) L1 hung for good twice in
  # an hour of boot loops, both times when the host got busy (a compile), its two vCPU threads
  # spinning on futexes and its console silent; with one, over 100 boots of our VMM beside a
  # compile, the tests and the chaos soak gave no hang and no failed boot. Multi-threaded TCG
  # emulating nested SVM on two vCPUs is the suspect; --smp 2 is still there to try it.
  exec qemu-system-x86_64 \
    -M q35 -accel tcg,thread=multi,tb-size=512 -cpu qemu64,+svm,+npt -smp "$smp" -m "$memory" \
    -nodefaults -no-user-config -nographic -no-reboot \
    -kernel "$image/vmlinuz" -initrd "$image/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 hive.cgroup=$cgroup" \
    -serial "file:$console" \
    -chardev "socket,id=ctl,path=$ctl,server=on,wait=off" -serial chardev:ctl \
    -drive "file=$image/root.ext4,format=raw,if=virtio,readonly=on" \
    -drive "file=$assets,format=raw,if=virtio,readonly=on" \
    -drive "file=$bin,format=raw,if=virtio,readonly=on" \
    -netdev "$net" -device virtio-net-pci,netdev=n0,romfile= \
    "${extra[@]}"
}

# ---------------------------------------------------------------------------------------------
# exec: one command through the control shell
# ---------------------------------------------------------------------------------------------
cmd_exec() {
  local ctl=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --ctl) [ $# -ge 2 ] || die "--ctl needs a socket path"; ctl="$2"; shift ;;
      --) shift; break ;;
      *) die "exec: unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
  [ -S "$ctl" ] || die "--ctl: no control socket at '$ctl' (is L1 running?)"
  [ $# -gt 0 ] || die "exec needs a command after --"
  python3 "$here/ctl.py" "$ctl" "$*"
}

case "$cmd" in
  image) cmd_image "$@" ;;
  assets) cmd_assets "$@" ;;
  bin) cmd_bin "$@" ;;
  boot) cmd_boot "$@" ;;
  exec) cmd_exec "$@" ;;
  *) die "unknown command '$cmd' (see --help)" ;;
esac
