#!/usr/bin/env bash
# Builds the two read-only image directories every cell uses:
#
#   build image  a minimal Debian 12 (debootstrap minbase) with git, openssh-client (ssh clones of
#                private repositories), ca-certificates, iproute2,
#                nftables, make and a user `build` (uid/gid 1000). Build steps run over it.
#   cell rootfs  the same Debian base plus /sbin/hive-cell (static, from this checkout) and the
#                mount points /run/hive, /images/build, /var/lib/hive. The cell daemon is PID 1
#                of it, in a sandbox (overlay lowerdir) or a microVM (ext4 root disk).
#
# Both are cached under ${HIVE_CACHE:-/var/cache/hive}/images by content hash:
#   base-<key>/rootfs    key = sha256(suite, mirror, package list, the base recipe below)
#   cell-<key>/rootfs    key = sha256(base key, sha256 of the hive-cell binary, the cell recipe)
# The cell rootfs hard-links the base files (cp -al): both trees are read-only lowerdirs, so
# sharing inodes is safe and costs no space. Each is one directory usable as an overlay lowerdir.
#
# Stdout is only KEY=PATH lines (eval-able); progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${HIVE_CACHE:-/var/cache/hive}"
suite="bookworm"
mirror="${HIVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Packages the build image carries on top of minbase. Changing this list changes the key.
packages="git,ca-certificates,iproute2,nftables,make,openssh-client"
target_triple="x86_64-unknown-linux-gnu"
cell_binary=""
want_disk=0

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--disk] [--cell-binary PATH]

Build (or reuse from cache) the Hive build image and cell rootfs directories.

Prints on stdout:
  HIVE_BUILD_IMAGE=<dir>        Debian $suite minbase + $packages, user build 1000:1000
  HIVE_CELL_ROOTFS=<dir>        the same base + /sbin/hive-cell + /run/hive /images/build /var/lib/hive
with --disk also:
  HIVE_BUILD_IMAGE_DISK=<file>  ext4 image of the build image (mkfs.ext4 -d)
  HIVE_CELL_ROOTFS_DISK=<file>  ext4 image of the cell rootfs (microVM root disk)

Options:
  --disk               also produce the ext4 disk images (for the microVM / QEMU path)
  --cell-binary PATH   use this static hive-cell instead of building it with cargo
  -h, --help           this text

Environment:
  HIVE_CACHE           cache root (default /var/cache/hive)
  HIVE_DEBIAN_MIRROR   Debian mirror for debootstrap (default http://deb.debian.org/debian)

Without --cell-binary the cell daemon is built static from $repo:
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p hive-cell --target $target_triple
Needs root, debootstrap, and e2fsprogs for --disk. Typical use:
  eval "\$(deploy/images/build-images.sh)"
USAGE
}

die() { echo "build-images: error: $*" >&2; exit 1; }
log() { echo "build-images: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --disk) want_disk=1 ;;
    --cell-binary)
      [ $# -ge 2 ] || die "--cell-binary needs a path"
      cell_binary="$2"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
mkdir -p "$cache/images"

# Serialises image builds across concurrent callers (CI, tests, local-hive all call this).
exec 9>"$cache/images/.lock"
flock 9

sha() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------------------------
# 1. Debian base (the build image)
# ---------------------------------------------------------------------------------------------
build_base() {
  local tmp start
  start=$(date +%s)
  tmp="$(mktemp -d "$cache/images/.base-$base_key.XXXXXX")"
  log "debootstrap $suite minbase (+$packages) from $mirror into $tmp (a few minutes)"
  if ! debootstrap --variant=minbase --include="$packages" "$suite" "$tmp/rootfs" "$mirror" \
      >"$tmp/debootstrap.log" 2>&1; then
    tail -n 30 "$tmp/debootstrap.log" >&2
    die "debootstrap failed; full log in $tmp/debootstrap.log"
  fi
  # The build user. Steps run as 1000:1000; the name makes `id`, `git` and `ls -l` readable.
  chroot "$tmp/rootfs" /usr/sbin/groupadd --gid 1000 build
  chroot "$tmp/rootfs" /usr/sbin/useradd --uid 1000 --gid 1000 --create-home --shell /bin/sh build
  # Nothing of the build host leaks in: no resolver, no apt caches, a neutral hostname.
  : >"$tmp/rootfs/etc/resolv.conf"
  echo cell >"$tmp/rootfs/etc/hostname"
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
  # Reproducible mode bits for the shared read-only trees.
  chmod 0755 "$tmp/rootfs"
  echo "debian $suite minbase +$packages from $mirror, built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s" \
    >"$tmp/BUILD-INFO"
  rm -f "$tmp/debootstrap.log"
  mv "$tmp" "$base"
  log "base image ready in $(( $(date +%s) - start ))s: $base/rootfs"
}

# The key covers what decides the base's content: suite, mirror, package list and the recipe
# itself (build_base's text), not the rest of this script, so editing the cell part or the disk
# part does not redo a minutes-long debootstrap.
base_key="$( { echo "$suite $mirror $packages"; declare -f build_base; } | sha)"
base="$cache/images/base-$base_key"

if [ -d "$base/rootfs" ]; then
  log "base image cached: $base/rootfs"
else
  build_base
fi
for tool in git update-ca-certificates ip nft make ssh; do
  chroot "$base/rootfs" /bin/sh -c "command -v $tool" >/dev/null \
    || die "base image $base/rootfs lacks '$tool'; remove $base and re-run"
done
getent_build="$(chroot "$base/rootfs" /usr/bin/getent passwd build || true)"
case "$getent_build" in
  build:x:1000:1000:*) ;;
  *) die "base image $base/rootfs has no user build 1000:1000 (got '$getent_build')" ;;
esac

# ---------------------------------------------------------------------------------------------
# 2. The static cell daemon
# ---------------------------------------------------------------------------------------------
if [ -z "$cell_binary" ]; then
  command -v cargo >/dev/null || die "cargo not found; install Rust or pass --cell-binary"
  log "building static hive-cell (release, $target_triple)"
  # The explicit --target keeps RUSTFLAGS away from build scripts and proc-macros.
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release -p hive-cell --target "$target_triple" >&2) \
    || die "cargo build of hive-cell failed (see above)"
  cell_binary="$repo/target/$target_triple/release/hive-cell"
fi
[ -f "$cell_binary" ] || die "cell daemon binary $cell_binary does not exist"
[ -x "$cell_binary" ] || die "cell daemon binary $cell_binary is not executable"
# PID 1 of a cell has no loader or libraries it could trust: the binary must be static.
if command -v readelf >/dev/null; then
  if readelf -l "$cell_binary" | grep -q 'Requesting program interpreter'; then
    die "$cell_binary is dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" --target $target_triple"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 3. Cell rootfs = base (hard links) + /sbin/hive-cell + mount points
# ---------------------------------------------------------------------------------------------
build_cell() {
  local tmp
  tmp="$(mktemp -d "$cache/images/.cell-$cell_key.XXXXXX")"
  cp -al "$base/rootfs" "$tmp/rootfs"
  # A fresh inode, never a hard link: the binary differs per cell rootfs.
  install -m 0755 -o root -g root "$cell_binary" "$tmp/rootfs/sbin/hive-cell"
  # Release builds carry debuginfo (profile.release debug=1): tens of MiB a cell would page in
  # for nothing. Symbols stay, so backtraces still name functions.
  if command -v strip >/dev/null; then strip --strip-debug "$tmp/rootfs/sbin/hive-cell"; fi
  install -d -m 0755 "$tmp/rootfs/run/hive" "$tmp/rootfs/images/build" "$tmp/rootfs/var/lib/hive"
  echo "base-$base_key + hive-cell sha256:$cell_sha from $cell_binary, built $(date -u +%FT%TZ)" \
    >"$tmp/BUILD-INFO"
  mv "$tmp" "$cell"
  log "cell rootfs ready: $cell/rootfs"
}

cell_sha="$(sha <"$cell_binary")"
cell_key="$( { echo "$base_key $cell_sha"; declare -f build_cell; } | sha)"
cell="$cache/images/cell-$cell_key"

if [ -d "$cell/rootfs" ]; then
  log "cell rootfs cached: $cell/rootfs"
else
  build_cell
fi

# Every rebuilt hive-cell makes a new cell rootfs. Keep the newest few and anything touched in
# the last two hours (a running box may still use an older one as its lowerdir); drop the rest.
touch "$cell"
find "$cache/images" -mindepth 1 -maxdepth 1 -type d -name 'cell-*' -printf '%T@ %p\n' \
  | sort -rn | tail -n +5 | cut -d' ' -f2- | while read -r old; do
      if [ -n "$(find "$old" -maxdepth 0 -mmin +120)" ]; then
        log "pruning old cell rootfs $old"
        rm -rf "$old"
      fi
    done

# ---------------------------------------------------------------------------------------------
# 4. ext4 disks for the microVM path (optional)
# ---------------------------------------------------------------------------------------------
# make_disk DIR IMG: an ext4 image holding DIR's tree, ownership and modes (mke2fs -d), sized to
# the content plus 25% and 64 MiB of slack so the guest can mount it and ext4 has its journal.
make_disk() {
  local dir="$1" img="$2" used_kib size_mib tmp
  [ -f "$img" ] && { log "disk cached: $img"; return 0; }
  command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
  used_kib="$(du -sk --apparent-size "$dir" | cut -f1)"
  size_mib=$(( used_kib * 5 / 4 / 1024 + 64 ))
  tmp="$img.tmp.$$"
  rm -f "$tmp"
  truncate -s "${size_mib}M" "$tmp"
  if ! mkfs.ext4 -q -F -L hive -E root_owner=0:0 -d "$dir" "$tmp" >&2; then
    rm -f "$tmp"
    die "mkfs.ext4 -d $dir failed"
  fi
  mv "$tmp" "$img"
  log "disk ready (${size_mib} MiB): $img"
}

echo "HIVE_BUILD_IMAGE=$base/rootfs"
echo "HIVE_CELL_ROOTFS=$cell/rootfs"
if [ "$want_disk" = 1 ]; then
  make_disk "$base/rootfs" "$base/build-image.ext4"
  make_disk "$cell/rootfs" "$cell/cell-rootfs.ext4"
  echo "HIVE_BUILD_IMAGE_DISK=$base/build-image.ext4"
  echo "HIVE_CELL_ROOTFS_DISK=$cell/cell-rootfs.ext4"
fi
