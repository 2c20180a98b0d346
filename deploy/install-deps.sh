#!/usr/bin/env bash
# Installs the Debian 12 packages Hive's build, images, local hive and tests need.
# Idempotent and quiet; run as root. Rust itself comes from rustup (not installed here).
set -euo pipefail

case "${1:-}" in
  -h|--help)
    cat <<USAGE
Usage: deploy/install-deps.sh

Installs (apt) what a bare Debian 12 lacks for Hive: the C toolchain and protoc (building the
workspace), debootstrap and e2fsprogs (cell images), linux-source-6.1 and its build deps (guest
kernel), qemu-system-x86 (guest boot check), iproute2/nftables (sandbox cells), postgresql
(store tests), chromium (the dashboard's browser test), and openssl/curl/jq/git (scripts,
webhooks, the demo git server).
Needs root. Checks that cargo is on PATH (install Rust with rustup if it is not).
USAGE
    exit 0 ;;
  "") ;;
  *) echo "install-deps: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "install-deps: must run as root" >&2; exit 2; }

packages=(
  build-essential pkg-config ca-certificates curl git jq openssl python3 procps psmisc
  util-linux iproute2 nftables kmod file
  protobuf-compiler libprotobuf-dev
  debootstrap debian-archive-keyring e2fsprogs busybox-static
  postgresql postgresql-client
  qemu-system-x86
  linux-source-6.1 flex bison bc libelf-dev libssl-dev cpio xz-utils
  chromium fonts-dejavu-core
  openssh-server
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # openssh-server is here for its sshd binary (the e2e tests' ssh git host runs its own in a
  # namespace); a machine that had no ssh service gets none listening from us.
  if [[ " ${missing[*]} " == *" openssh-server "* ]] && command -v systemctl >/dev/null \
      && [ -d /run/systemd/system ]; then
    systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
  fi
else
  echo "install-deps: all ${#packages[@]} packages already installed" >&2
fi

if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || {
  echo "install-deps: cargo not found: install Rust with rustup (https://rustup.rs), then re-run" >&2
  exit 2
}

# The test runner deploy/test.sh uses (retries and flaky reporting: .config/nextest.toml). It
# falls back to `cargo test` without it, but CI should run what developers run.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "install-deps: cargo install cargo-nextest (a few minutes, once)" >&2
  cargo install --locked cargo-nextest >/dev/null 2>&1 || \
    echo "install-deps: cargo-nextest did not install; deploy/test.sh will use cargo test" >&2
fi
