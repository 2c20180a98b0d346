#!/usr/bin/env bash
# THE test command of the repository (README): builds everything, prepares the images, runs
# every test, the lints, and the guest image boot check under QEMU.
#
# Order, chosen so the slow artefacts overlap with compilation:
#   0. what the machine lacks is installed (deploy/install-deps.sh: apt packages, cargo-nextest;
#      a second when all is there) and the tests' PostgreSQL is started
#      (deploy/postgres/setup-test-db.sh) unless HIVE_TEST_POSTGRES_URL names one
#   1. guest kernel build starts in the background (cached by config hash; minutes when cold)
#   2. cargo build --workspace --all-targets
#   3. images: deploy/images/build-images.sh --disk (cached by content hash)
#   4. tests: cargo nextest run --workspace (or cargo test --workspace), all but the microVM suite
#   5. guest boot check (deploy/guest/boot-check.sh) once the kernel is there
#   6. the microVM end-to-end suite (tests named microvm_e2e_*): real microVM cells on our VMM in
#      an emulated KVM host (deploy/kvm-host/), which needs the kernel; its time is printed
#   7. cargo clippy --workspace --all-targets -- -D warnings; cargo fmt --check (last: clippy's
#      build scripts would make the tests' compiled crates stale for the microVM suite)
# Every step runs even when an earlier one failed (except where it needs that step's output);
# the summary at the end names each failure, and the exit status is 1 when any step failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
logdir="${HIVE_TEST_LOGDIR:-$repo/target/hive-test-logs}"
run_kernel=1
run_lint=1
run_microvm=1
run_install=1
test_args=()

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--no-install] [--no-kernel] [--no-lint] [--no-microvm] [-- TEST-FILTER-ARGS...]

Install what this machine lacks (deploy/install-deps.sh; a PostgreSQL for the store tests via
deploy/postgres/setup-test-db.sh), then build everything and run every Hive test:
  cargo build, images (deploy/images/build-images.sh --disk), cargo nextest run --workspace
  (cargo test --workspace when cargo-nextest is absent), the guest boot check under QEMU microvm
  (deploy/guest/boot-check.sh), the microVM end-to-end suite (microvm_e2e_*) in an emulated KVM
  host (deploy/kvm-host/kvm-host.sh), then clippy -D warnings and fmt --check.

Options:
  --no-install  do not install packages or start PostgreSQL (the PostgreSQL tests then need
                HIVE_TEST_POSTGRES_URL, else they say SKIPPED)
  --no-kernel   skip the guest kernel build, the QEMU boot check and the microVM suite
  --no-lint     skip clippy and rustfmt
  --no-microvm  skip the microVM end-to-end suite (minutes: every test boots an emulated host)
  -- ARGS       passed to the test runner (e.g. -- -E 'test(e2e)' for nextest)
  -h, --help    this text

Environment:
  HIVE_CACHE               cache for kernel and images (default /var/cache/hive)
  HIVE_TEST_POSTGRES_URL   PostgreSQL for the store tests (.ci/run sets it up; see
                           deploy/postgres/setup-test-db.sh); passed through to the tests
  CI=true                  missing prerequisites (kernel source, QEMU, root) are errors
                           instead of loudly skipped steps
The tests find the images and kernel in HIVE_CACHE (exported); the paths are not exported
(hive-cell's own HIVE_BUILD_IMAGE means the in-cell path).
Logs of every step: $logdir/
Needs root (debootstrap, namespaces).
USAGE
}

die() { echo "test.sh: error: $*" >&2; exit 2; }
say() { printf '\n=== %s\n' "$*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-kernel) run_kernel=0 ;;
    --no-lint) run_lint=0 ;;
    --no-microvm) run_microvm=0 ;;
    --no-install) run_install=0 ;;
    --) shift; test_args=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

ci="${CI:-false}"
[ "$(id -u)" = 0 ] || die "run as root: the images (debootstrap) and the sandbox tests need it"
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || die "cargo not found in PATH (install Rust with rustup)"
if [ "$run_install" = 1 ]; then
  "$here/install-deps.sh" || die "deploy/install-deps.sh failed (see above)"
  if [ -z "${HIVE_TEST_POSTGRES_URL:-}" ]; then
    eval "$("$here/postgres/setup-test-db.sh")" || die "deploy/postgres/setup-test-db.sh failed (see above)"
  fi
fi
if [ -n "${HIVE_TEST_POSTGRES_URL:-}" ]; then export HIVE_TEST_POSTGRES_URL; fi
mkdir -p "$logdir"
rm -f "$logdir/test.log" "$logdir/microvm-e2e.log" "$logdir/test-counts.txt"
cd "$repo"

declare -a results=()
failed=0
# step NAME CMD...: runs CMD, tees its output to $logdir/NAME.log, records pass/fail and time.
step() {
  local name="$1" start rc
  shift
  say "$name: $*"
  start=$(date +%s)
  set +e
  "$@" 2>&1 | tee "$logdir/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$(( $(date +%s) - start ))
  if [ "$rc" = 0 ]; then
    results+=("PASS  $name (${took}s)")
  else
    results+=("FAIL  $name (${took}s, exit $rc, log $logdir/$name.log)")
    failed=1
  fi
  return "$rc"
}
skip() {
  results+=("SKIP  $1: $2")
  echo "test.sh: SKIPPING $1: $2" >&2
  if [ "$ci" = true ]; then
    results+=("FAIL  $1 must not be skipped in CI")
    failed=1
  fi
}

# 1. Guest kernel in the background: it is the longest single artefact when the cache is cold.
kernel_pid=""
if [ "$run_kernel" = 1 ]; then
  if dpkg-query -W -f='${Status}' linux-source-6.1 2>/dev/null | grep -q "ok installed"; then
    say "guest kernel: building in the background (log $logdir/kernel.log)"
    "$here/guest/build-kernel.sh" >"$logdir/kernel.env" 2>"$logdir/kernel.log" &
    kernel_pid=$!
  else
    skip "guest-kernel" "linux-source-6.1 is not installed"
  fi
fi

# 2. Build.
build_ok=0
step build cargo build --workspace --all-targets && build_ok=1

# 3. Images: the sandbox tests need the directories, the boot check the disks.
# The paths are NOT exported to the tests: hive-cell reads HIVE_BUILD_IMAGE as its in-cell
# image path (/images/build), so a host path inherited by a cell daemon a test spawns would be
# wrong there. The tests find the images in the cache (HIVE_CACHE) themselves.
images_ok=0
declare -A img=()
if step images "$here/images/build-images.sh" --disk; then
  images_ok=1
  # Cached now, so this second call only prints the KEY=PATH lines (stdout) again.
  while IFS='=' read -r k v; do
    case "$k" in HIVE_*) img[$k]="$v" ;; esac
  done < <("$here/images/build-images.sh" --disk 2>/dev/null)
  echo "test.sh: images: build image ${img[HIVE_BUILD_IMAGE]:-?}, cell rootfs ${img[HIVE_CELL_ROOTFS]:-?}" >&2
fi
export HIVE_CACHE="${HIVE_CACHE:-/var/cache/hive}"

# 4. Tests. With the images missing the sandbox tests would fail for the wrong reason: run them
# anyway (their own skip/fail messages say why), the summary already shows the images failure.
# The microVM suite runs in step 6, once the guest kernel it boots is there.
have_nextest=0
cargo nextest --version >/dev/null 2>&1 && have_nextest=1
if [ "$build_ok" = 1 ]; then
  if [ "$have_nextest" = 1 ]; then
    step test cargo nextest run --workspace --no-fail-fast -E 'not test(microvm_e2e)' "${test_args[@]}" || true
  else
    step test cargo test --workspace --no-fail-fast "${test_args[@]}" -- --skip microvm_e2e || true
  fi
else
  results+=("FAIL  test: not run, the build failed")
fi

# 5. Guest boot check.
if [ -n "$kernel_pid" ]; then
  say "guest kernel: waiting for the background build"
  if wait "$kernel_pid"; then
    results+=("PASS  guest-kernel ($(grep -o 'HIVE_GUEST_KERNEL=.*' "$logdir/kernel.env"))")
    export "$(grep -o 'HIVE_GUEST_KERNEL=.*' "$logdir/kernel.env")"
    if [ "$images_ok" = 1 ]; then
      if command -v qemu-system-x86_64 >/dev/null; then
        step boot-check "$here/guest/boot-check.sh" \
          --kernel "$HIVE_GUEST_KERNEL/vmlinux" \
          --rootfs-disk "${img[HIVE_CELL_ROOTFS_DISK]}" \
          --build-disk "${img[HIVE_BUILD_IMAGE_DISK]}" \
          --cell-rootfs-dir "${img[HIVE_CELL_ROOTFS]}" \
          --build-image-dir "${img[HIVE_BUILD_IMAGE]}" || true
      else
        skip "boot-check" "qemu-system-x86_64 is not installed"
      fi
    else
      results+=("FAIL  boot-check: not run, the images failed")
      failed=1
    fi
  else
    tail -n 40 "$logdir/kernel.log" >&2
    results+=("FAIL  guest-kernel (log $logdir/kernel.log)")
    failed=1
  fi
fi

# 6. The microVM end-to-end suite (one emulated KVM host per test, one test at a time).
if [ "$run_kernel" = 1 ] && [ "$run_microvm" = 1 ] && [ "$build_ok" = 1 ]; then
  if [ "$have_nextest" = 1 ]; then
    # --workspace, as the build and the main run: with -p alone cargo unifies features for that
    # package only and recompiled a third of the tree (3m50s in CI) before the first test.
    step microvm-e2e cargo nextest run --workspace --no-fail-fast -E 'test(microvm_e2e)' || true
  else
    step microvm-e2e cargo test --workspace --no-fail-fast --test microvm_e2e -- --test-threads 1 || true
  fi
fi

# 7. Lints, last: clippy re-runs build scripts (ring and what depends on it) in its own
# profile, which made the test profile's copies stale: run before the microVM suite it cost that
# suite 2m15s of recompilation in CI.
if [ "$run_lint" = 1 ]; then
  step clippy cargo clippy --workspace --all-targets -- -D warnings || true
  step fmt cargo fmt --all --check || true
fi

say "summary"
printf '%s\n' "${results[@]}" >&2
# The test runner's counts as the closing line (nextest's Summary line, or cargo test's results).
count_of() { grep -oE "[0-9]+ $1" | awk '{s+=$1} END {print s+0}'; }
# Counts over both test steps (the workspace run and the microVM suite).
if [ -f "$logdir/test.log" ]; then
  passed=0 nfailed=0
  for log in "$logdir/test.log" "$logdir/microvm-e2e.log"; do
    [ -f "$log" ] || continue
    if grep -q "Summary \[" "$log"; then
      lines=$(grep "Summary \[" "$log" | tail -n 1 || true)
    else
      lines=$(grep "^test result:" "$log" || true)
    fi
    # count_of prints a number even when grep finds none (and then fails): keep its output.
    p=$(count_of passed <<<"$lines" || true)
    f=$(count_of failed <<<"$lines" || true)
    passed=$(( passed + ${p:-0} ))
    nfailed=$(( nfailed + ${f:-0} ))
  done
  # Skipped: only the workspace run's (the microVM run filters the others out, not skips them).
  if grep -q "Summary \[" "$logdir/test.log"; then
    skipped=$(grep "Summary \[" "$logdir/test.log" | tail -n 1 | count_of skipped || true)
  else
    skipped=$(grep "^test result:" "$logdir/test.log" | count_of ignored || true)
  fi
  # Passed only on their retry (.config/nextest.toml): named, so a flake is seen, not hidden.
  flaky=$(cat "$logdir/test.log" "$logdir/microvm-e2e.log" 2>/dev/null | grep -E "^ *FLAKY " \
    | sed -E 's/^ +/  /' | sort -u || true)
  [ -n "$flaky" ] && printf '%s\n' "$flaky" >&2
  echo "tests: ${passed:-0} passed, ${nfailed:-0} failed, ${skipped:-0} skipped" | tee "$logdir/test-counts.txt"
fi
exit "$failed"
