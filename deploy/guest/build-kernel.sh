#!/usr/bin/env bash
# Builds the Hive guest kernel (vmlinux with a PVH note, and bzImage) from Debian's
# linux-source-6.1 package and the config fragment next to this script.
#
# The build takes minutes on a small machine, so the result is cached under
#   ${HIVE_CACHE:-/var/cache/hive}/kernel/<key>/{vmlinux,bzImage,config}
# where <key> is the sha256 of: the fragment, this script, and the linux-source
# package version. It is rebuilt only when that directory is missing.
#
# Prints one line on stdout: HIVE_GUEST_KERNEL=<dir> (everything else goes to stderr).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/hive-guest.config"
cache="${HIVE_CACHE:-/var/cache/hive}"
jobs="${HIVE_KERNEL_JOBS:-$(nproc)}"
source_pkg="linux-source-6.1"
print_key_only=0

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--print-key] [--jobs N]

Build the Hive guest kernel from Debian's $source_pkg package, using the
tinyconfig-based fragment $fragment.

Output (cached by sha256 of fragment + this script + package version):
  \${HIVE_CACHE:-/var/cache/hive}/kernel/<key>/vmlinux   ELF with PVH entry (QEMU microvm, Hive VMM)
  \${HIVE_CACHE:-/var/cache/hive}/kernel/<key>/bzImage
  \${HIVE_CACHE:-/var/cache/hive}/kernel/<key>/config    the resolved .config
Stdout: HIVE_GUEST_KERNEL=<that directory>

Options:
  --print-key   print the cache key and whether it is cached, build nothing
  --jobs N      make -j N (default: nproc; env HIVE_KERNEL_JOBS)
  -h, --help    this text

Needs: $source_pkg, build-essential, flex, bison, bc, libelf-dev, libssl-dev, cpio, xz-utils.
The build runs under 'nice' so other work on the machine keeps going.
USAGE
}

die() { echo "build-kernel: error: $*" >&2; exit 1; }
log() { echo "build-kernel: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --print-key) print_key_only=1 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs="$2"; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive integer, got '$jobs'"
[ -f "$fragment" ] || die "config fragment $fragment is missing"

pkg_version="$(dpkg-query -W -f='${Version}' "$source_pkg" 2>/dev/null || true)"
[ -n "$pkg_version" ] || die "package $source_pkg is not installed (apt-get install $source_pkg)"
tarball="/usr/src/$source_pkg.tar.xz"
[ -f "$tarball" ] || die "$tarball is missing although $source_pkg $pkg_version is installed"

key="$( { sha256sum <"$fragment"; sha256sum <"${BASH_SOURCE[0]}"; echo "$source_pkg=$pkg_version"; } | sha256sum | cut -c1-16)"
out="$cache/kernel/$key"

if [ "$print_key_only" = 1 ]; then
  if [ -f "$out/vmlinux" ]; then echo "$key cached $out"; else echo "$key missing $out"; fi
  exit 0
fi

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached: $out"
  echo "HIVE_GUEST_KERNEL=$out"
  exit 0
fi

for tool in make gcc flex bison bc cpio xz; do
  command -v "$tool" >/dev/null || die "'$tool' not found (install the kernel build deps, see --help)"
done

mkdir -p "$cache/kernel"
# One builder at a time per key: a second caller waits, then finds the cache filled.
exec 9>"$cache/kernel/.lock-$key"
flock 9
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
  log "cached (built by a concurrent run): $out"
  echo "HIVE_GUEST_KERNEL=$out"
  exit 0
fi

work="$(mktemp -d "$cache/kernel/build-$key.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

start=$(date +%s)
log "extracting $tarball ($source_pkg $pkg_version) into $work"
tar -C "$work" -xf "$tarball"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
[ -n "$src" ] || die "no linux-source-* directory inside $tarball"

log "configuring: tinyconfig + $(basename "$fragment") + olddefconfig"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >&2
make -C "$src" -s olddefconfig >&2

# Every option the fragment asks for must have survived dependency resolution.
missing=()
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qxF "$line" "$src/.config" || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo unset))")
      ;;
    "# CONFIG_"*" is not set")
      sym="${line#\# }"; sym="${sym%% *}"
      if grep -qE "^${sym}=" "$src/.config"; then missing+=("$line (got: $(grep -E "^${sym}=" "$src/.config"))"); fi
      ;;
  esac
done <"$fragment"
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'build-kernel: option not honoured: %s\n' "${missing[@]}" >&2
  die "${#missing[@]} option(s) of $fragment were dropped by Kconfig; fix their dependencies in the fragment"
fi

log "building vmlinux + bzImage with -j$jobs (nice)"
nice -n 10 make -C "$src" -s -j"$jobs" vmlinux bzImage >&2

tmp_out="$(mktemp -d "$cache/kernel/out-$key.XXXXXX")"
cp "$src/vmlinux" "$tmp_out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$tmp_out/bzImage"
cp "$src/.config" "$tmp_out/config"
echo "$source_pkg=$pkg_version built $(date -u +%FT%TZ) in $(( $(date +%s) - start ))s" >"$tmp_out/BUILD-INFO"
rm -rf "$out"
mv "$tmp_out" "$out"
log "done in $(( $(date +%s) - start ))s: $out"
echo "HIVE_GUEST_KERNEL=$out"
