#!/usr/bin/env bash
# One command for a whole local hive on this machine:
#   control plane (SQLite under <data-dir>/control-plane) + one box (sandbox backend, warm pool)
#   + a "public internet" git host (netns on 198.18.0.2, git daemon) serving a demo repository
#   + a demo project pointing at it.
# Then it prints the `export HIVE_TOKEN=...` line hivectl needs (the control plane's first admin
# token, in <data-dir>/control-plane/admin.token), the curl line that sends a signed GitHub push
# webhook and the hivectl line that follows the build's logs, and stays in the foreground. Ctrl-C (or SIGTERM) stops the box first
# (it destroys its cells), then the control plane, then the git host.
#
# --smoke sends that webhook itself, follows the build to its end and exits with its result:
# the scripted check that the whole path works.
#
# --microvm runs the box with the microVM backend (real guests on Hive's VMM) inside an emulated
# KVM host (deploy/kvm-host/kvm-host.sh: QEMU TCG with AMD SVM), for machines without VT-x/AMD-V:
# slower than hardware, but the production path.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
data_dir="$repo/hive-data"
http_addr="127.0.0.1:8080"
grpc_addr="127.0.0.1:50051"
box_addr="127.0.0.1:50052"
pool=""
microvm=0
git_addr="198.18.0.2"
secret="${HIVE_DEMO_SECRET:-local-hive-demo-secret}"
do_build=1
smoke=0
profile="debug"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [options]

Start a local hive: builds the binaries and images, starts hive-control-plane and one hive-box
(sandbox backend), a git server on test host $git_addr (own netns) with a demo repository,
registers project 'demo', prints the signed-webhook curl line and 'hivectl logs -f'. Ctrl-C
stops everything.

Options:
  --data-dir DIR     state of this hive (default ./hive-data in the repo: $data_dir)
  --http-addr A:P    control plane webhook/HTTP listener (default $http_addr)
  --grpc-addr A:P    control plane gRPC listener (default $grpc_addr)
  --box-addr A:P     control plane box listener, TLS (default $box_addr); the box joins it
                     with a token from `hivectl box join-token` on its first start
  --pool CLASS=N     warm pool of the box (default small=2; small=1 with --microvm)
  --microvm          run the box with the microVM backend inside an emulated KVM host (QEMU TCG
                     with AMD SVM; the first run builds the guest kernel, ~6 min, and the host
                     image, ~1 min, both cached)
  --release          build and run release binaries (default: debug, quicker to compile)
  --no-build         use the binaries already in target/
  --build            run cargo even when no source is newer than the binaries
  --smoke            send the webhook, follow the build, stop everything, exit 0 iff it succeeded
  -h, --help         this text

Environment: HIVE_CACHE (images, default /var/cache/hive), HIVE_DEMO_SECRET (webhook secret).
Needs root (namespaces, cgroups, nftables).
USAGE
}

die() { echo "local-hive: error: $*" >&2; exit 1; }
log() { echo "local-hive: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --data-dir) [ $# -ge 2 ] || die "--data-dir needs a directory"; data_dir="$2"; shift ;;
    --http-addr) [ $# -ge 2 ] || die "--http-addr needs ADDR:PORT"; http_addr="$2"; shift ;;
    --grpc-addr) [ $# -ge 2 ] || die "--grpc-addr needs ADDR:PORT"; grpc_addr="$2"; shift ;;
    --box-addr) [ $# -ge 2 ] || die "--box-addr needs ADDR:PORT"; box_addr="$2"; shift ;;
    --pool) [ $# -ge 2 ] || die "--pool needs CLASS=N"; pool="$2"; shift ;;
    --release) profile="release" ;;
    --no-build) do_build=0 ;;
    --build) do_build=2 ;;
    --smoke) smoke=1 ;;
    --microvm) microvm=1 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
if [ -z "$pool" ]; then
  if [ "$microvm" = 1 ]; then pool="small=1"; else pool="small=2"; fi
fi
[[ "$pool" =~ ^[a-z0-9-]+=[0-9]+$ ]] || die "--pool '$pool': expected CLASS=N, e.g. small=2"
for a in "$http_addr" "$grpc_addr" "$box_addr"; do
  [[ "$a" =~ ^[0-9.]+:[0-9]+$ ]] || die "listener '$a': expected IPv4:PORT"
done
[ "$(id -u)" = 0 ] || die "must run as root (the box makes namespaces, cgroups, nftables rules)"
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
# What a fresh Debian 12 lacks (apt packages; a second when all is there).
"$here/install-deps.sh" || die "deploy/install-deps.sh failed (see above)"
for tool in git openssl curl ip jq; do
  command -v "$tool" >/dev/null || die "'$tool' not found"
done

mkdir -p "$data_dir"
data_dir="$(cd "$data_dir" && pwd)"
logs="$data_dir/logs"
mkdir -p "$logs"
bin="$repo/target/$profile"
# Clients reach a listener on 0.0.0.0 on loopback. On loopback the gRPC and HTTP listeners are
# plaintext; anywhere else they are TLS with a certificate from the hive's CA (set below from
# the control plane's ready file).
grpc_url="http://${grpc_addr/#0.0.0.0:/127.0.0.1:}"
http_url="http://${http_addr/#0.0.0.0:/127.0.0.1:}"
curl_tls=""
hivectl() { "$bin/hivectl" --addr "$grpc_url" "$@"; }

# --- stop everything we started, in reverse order, exactly once --------------------------------
box_pid="" cp_pid="" l1_pid="" git_host_up=0 stopping=0
stop_all() {
  [ "$stopping" = 0 ] || return 0
  stopping=1
  log "stopping"
  if [ -n "$box_pid" ] && kill -0 "$box_pid" 2>/dev/null; then
    kill -TERM "$box_pid" 2>/dev/null || true
    # The box destroys its cells on SIGTERM; give it time before insisting.
    for _ in $(seq 300); do kill -0 "$box_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$box_pid" 2>/dev/null && { log "hive-box did not stop in 30s, killing"; kill -KILL "$box_pid" 2>/dev/null || true; }
    wait "$box_pid" 2>/dev/null || true
  fi
  if [ -n "$l1_pid" ] && kill -0 "$l1_pid" 2>/dev/null; then
    # The box and its microVM cells live only inside the emulated host: its end is theirs.
    kill -TERM "$l1_pid" 2>/dev/null || true
    wait "$l1_pid" 2>/dev/null || true
  fi
  if [ -n "$cp_pid" ] && kill -0 "$cp_pid" 2>/dev/null; then
    kill -TERM "$cp_pid" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$cp_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$cp_pid" 2>/dev/null && { log "hive-control-plane did not stop in 15s, killing"; kill -KILL "$cp_pid" 2>/dev/null || true; }
    wait "$cp_pid" 2>/dev/null || true
  fi
  if [ "$git_host_up" = 1 ]; then
    "$here/test-hosts/test-host.sh" down --name git || true
  fi
  log "stopped (state kept in $data_dir; logs in $logs)"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. binaries and images ---------------------------------------------------------------------
# newest_source_after FILE: prints a tracked or new source file (Rust, proto, manifests, the
# dashboard's assets) newer than FILE, or nothing. Cargo's own check is not enough here: it
# rebuilds what it thinks stale (a build script that tracks an environment variable, another
# user's or tool's build in the same target dir), ~36 s of compiling for an unchanged checkout.
newest_source_after() {
  [ -e "$1" ] || { echo "$1"; return; }
  local since
  since="$(stat -c %Y "$1")"
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard -- \
      '*.rs' '*.proto' '*.toml' 'Cargo.lock' '*.css' '*.js' \
    | xargs -0 -r stat -c '%Y %n' 2>/dev/null | sort -n | tail -n1 \
    | awk -v since="$since" '$1 >= since { sub(/^[0-9]+ /, ""); print }')
}
if [ "$do_build" = 1 ]; then
  for b in hive-control-plane hivectl hive-box; do
    changed="$(newest_source_after "$bin/$b")"
    [ -z "$changed" ] || break
  done
  if [ -z "$changed" ]; then
    log "binaries up to date (no source newer than $bin/hive-*); --build runs cargo anyway"
    do_build=0
  else
    log "rebuilding: $changed is newer than the binaries"
  fi
fi
# The cell daemon build-images.sh puts in the cell rootfs (static, release): reused the same way.
cell_static="$repo/target/x86_64-unknown-linux-gnu/release/hive-cell"
images_args=()
if [ "$do_build" = 0 ] && [ -x "$cell_static" ] && [ -z "$(newest_source_after "$cell_static")" ]; then
  images_args=(--cell-binary "$cell_static")
fi
if [ "$do_build" != 0 ]; then
  log "building hive-control-plane, hivectl, hive-box ($profile)"
  rel=(); [ "$profile" = release ] && rel=(--release)
  (cd "$repo" && cargo build --quiet "${rel[@]}" -p hive-control-plane -p hivectl -p hive-box --bins) \
    || die "cargo build failed"
fi
for b in hive-control-plane hivectl hive-box; do
  [ -x "$bin/$b" ] || die "$bin/$b is missing (run without --no-build)"
done
log "images (cached by content hash in ${HIVE_CACHE:-/var/cache/hive})"
if [ "$microvm" = 1 ]; then
  eval "$("$here/images/build-images.sh" --disk "${images_args[@]}")"
  log "guest kernel (cached; the first build takes minutes)"
  eval "$("$here/guest/build-kernel.sh")"
  log "emulated KVM host (cached)"
  eval "$("$here/kvm-host/kvm-host.sh" image)"
  eval "$("$here/kvm-host/kvm-host.sh" assets --guest-kernel "$HIVE_GUEST_KERNEL" \
    --rootfs-disk "$HIVE_CELL_ROOTFS_DISK" --build-disk "$HIVE_BUILD_IMAGE_DISK")"
  eval "$("$here/kvm-host/kvm-host.sh" bin --box-binary "$bin/hive-box")"
else
  eval "$("$here/images/build-images.sh" "${images_args[@]}")"
fi
export HIVE_BUILD_IMAGE HIVE_CELL_ROOTFS

# --- 2. the git host and the demo repository ----------------------------------------------------
git_root="$data_dir/git"
if [ ! -d "$git_root/demo.git" ]; then
  log "creating demo repository $git_root/demo.git"
  mkdir -p "$git_root"
  git init --quiet --bare --initial-branch=main "$git_root/demo.git"
  src="$(mktemp -d)"
  git init --quiet --initial-branch=main "$src"
  cat >"$src/Makefile" <<'MAKEFILE'
# The demo project's build: `make test` is the project's second build step.
test:
	@echo "running tests of $$(git rev-parse --short HEAD 2>/dev/null || echo demo) as $$(id -un)"
	@sh ./check.sh
MAKEFILE
  cat >"$src/check.sh" <<'CHECK'
#!/bin/sh
set -e
for i in 1 2 3; do echo "check $i ok"; done
CHECK
  echo "# demo: the repository a local hive builds" >"$src/README.md"
  git -C "$src" add -A
  git -C "$src" -c user.name=hive -c user.email=hive@localhost commit --quiet -m "demo: make test"
  git -C "$src" push --quiet "$git_root/demo.git" main
  rm -rf "$src"
fi
"$here/test-hosts/test-host.sh" up --name git --addr "$git_addr" --git-root "$git_root" >/dev/null
git_host_up=1
repo_url="git://$git_addr/demo.git"
rev="$(git --git-dir="$git_root/demo.git" rev-parse main)"
git ls-remote "$repo_url" main >/dev/null || die "git host does not serve $repo_url"
log "git host: $repo_url (main at ${rev:0:12})"

# --- 3. control plane ---------------------------------------------------------------------------
ready="$data_dir/control-plane.ready"
rm -f "$ready"
# 10.0.2.2: how a box in the emulated KVM host (--microvm) reaches this machine; the box
# listener's certificate names it.
"$bin/hive-control-plane" --http-addr "$http_addr" --grpc-addr "$grpc_addr" \
  --box-addr "$box_addr" --tls-san 10.0.2.2 \
  --data-dir "$data_dir/control-plane" --ready-file "$ready" >>"$logs/control-plane.log" 2>&1 &
cp_pid=$!
for _ in $(seq 300); do
  [ -s "$ready" ] && break
  kill -0 "$cp_pid" 2>/dev/null || { tail -n 20 "$logs/control-plane.log" >&2; die "hive-control-plane exited"; }
  sleep 0.1
done
[ -s "$ready" ] || die "hive-control-plane not ready after 30s (log: $logs/control-plane.log)"
log "control plane up: $(cat "$ready") (log $logs/control-plane.log)"
if [ "$(jq -r '.grpc_tls // false' "$ready")" = true ]; then
  grpc_url="https://${grpc_addr/#0.0.0.0:/127.0.0.1:}"
  HIVE_CA_SHA256="$(jq -r .ca_sha256 "$ready")"
  export HIVE_CA_SHA256
fi
if [ "$(jq -r '.http_tls // false' "$ready")" = true ]; then
  http_url="https://${http_addr/#0.0.0.0:/127.0.0.1:}"
  curl_tls="--cacert $data_dir/control-plane/pki/ca.pem "
fi
# The operator API wants a token: the admin token the control plane wrote on its first start.
token_file="$data_dir/control-plane/admin.token"
[ -s "$token_file" ] || die "no admin token in $token_file (was this data dir's control plane started with another --data-dir?)"
HIVE_TOKEN="$(cat "$token_file")"
export HIVE_TOKEN

# --- 4. box -------------------------------------------------------------------------------------
box_ready="$data_dir/box.ready"
rm -f "$box_ready"
# A box joins once with a one-time token (it keeps its certificate in <its data dir>/tls/);
# a box that already joined needs none.
join_token=""
if [ "$microvm" = 1 ] || [ ! -s "$data_dir/box/tls/box.pem" ]; then
  join_token="$(hivectl box join-token --ttl 1h)" || die "hivectl box join-token failed"
fi
if [ "$microvm" = 1 ]; then
  # The box runs inside the emulated host; QEMU user networking makes this machine's loopback
  # 10.0.2.2 there, so it dials the control plane above. Its /healthz is forwarded back here.
  health_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  cat >"$data_dir/l1-start.sh" <<START
#!/bin/sh
# Run by the emulated KVM host once it is up (log there: /var/log/start.log).
exec /hive/bin/hive-box --control-plane https://10.0.2.2:${box_addr##*:} --join-token $join_token --backend microvm \\
  --pool $pool --box-id local-microvm --data-dir /var/lib/hive-box \\
  --guest-kernel /hive/assets/vmlinux --guest-rootfs-disk /hive/assets/cell-rootfs.ext4 \\
  --build-image-disk /hive/assets/build-image.ext4 --health-addr 0.0.0.0:8081 \\
  --ready-timeout-secs 300 --health-timeout-secs 10 --cell-call-timeout-secs 60
START
  log "booting the emulated KVM host (console: $logs/l1-console.log; box log in it: /var/log/start.log)"
  "$here/kvm-host/kvm-host.sh" boot --image "$HIVE_KVM_HOST_IMAGE" --assets "$HIVE_KVM_HOST_ASSETS" \
    --bin "$HIVE_KVM_HOST_BIN" --ctl "$data_dir/l1-ctl.sock" --console "$logs/l1-console.log" \
    --hostfwd "tcp:127.0.0.1:$health_port-:8081" --start "$data_dir/l1-start.sh" \
    >>"$logs/l1-qemu.log" 2>&1 &
  l1_pid=$!
  for _ in $(seq 1200); do
    curl -sf "http://127.0.0.1:$health_port/healthz" >/dev/null 2>&1 && break
    kill -0 "$l1_pid" 2>/dev/null || { tail -n 20 "$logs/l1-console.log" >&2; die "the emulated KVM host exited"; }
    sleep 0.5
  done
  curl -sf "http://127.0.0.1:$health_port/healthz" >/dev/null 2>&1 \
    || die "hive-box in the emulated KVM host not up after 10 min (see: $here/kvm-host/kvm-host.sh exec --ctl $data_dir/l1-ctl.sock -- tail /var/log/start.log)"
  echo "{\"health\":\"127.0.0.1:$health_port\"}" >"$box_ready"
  log "box up in the emulated KVM host: health http://127.0.0.1:$health_port/healthz"
else
# HIVE_CELL_ROOTFS and HIVE_BUILD_IMAGE (exported above) tell the box which images to use.
HIVE_BOX_JOIN_TOKEN="$join_token" \
"$bin/hive-box" --control-plane "https://$box_addr" --backend sandbox --pool "$pool" \
  --data-dir "$data_dir/box" --health-addr 127.0.0.1:0 --ready-file "$box_ready" \
  >>"$logs/box.log" 2>&1 &
box_pid=$!
for _ in $(seq 300); do
  [ -s "$box_ready" ] && break
  kill -0 "$box_pid" 2>/dev/null || { tail -n 20 "$logs/box.log" >&2; die "hive-box exited"; }
  sleep 0.1
done
[ -s "$box_ready" ] || die "hive-box not ready after 30s (log: $logs/box.log)"
log "box up: $(cat "$box_ready") (log $logs/box.log)"
fi

# --- 5. demo project ----------------------------------------------------------------------------
if hivectl project show demo >/dev/null 2>&1; then
  log "project demo exists"
else
  hivectl project add demo --repo "$repo_url" --secret "$secret" \
    --step 'echo hello from hive' --step 'make test' >&2 || die "hivectl project add failed"
fi

# --- 6. the signed push ------------------------------------------------------------------------
payload="$data_dir/push.json"
cat >"$payload" <<JSON
{"ref":"refs/heads/main","before":"0000000000000000000000000000000000000000","after":"$rev",
 "repository":{"name":"demo","full_name":"local/demo","clone_url":"$repo_url","git_url":"$repo_url",
  "html_url":"$repo_url","url":"$repo_url"},
 "head_commit":{"id":"$rev","message":"demo: make test"},
 "pusher":{"name":"local-hive"}}
JSON
curl_line="curl -sS ${curl_tls}-X POST $http_url/webhooks/github -H 'Content-Type: application/json' -H 'X-GitHub-Event: push' -H \"X-GitHub-Delivery: \$(cat /proc/sys/kernel/random/uuid)\" -H \"X-Hub-Signature-256: sha256=\$(openssl dgst -sha256 -hmac '$secret' -r $payload | cut -d' ' -f1)\" --data-binary @$payload"
hivectl_line="$bin/hivectl --addr $grpc_url${HIVE_CA_SHA256:+ --ca-sha256 $HIVE_CA_SHA256}"

if [ "$smoke" = 1 ]; then
  log "smoke: waiting for the warm pool ($pool)"
  want="${pool#*=}"
  for _ in $(seq 120); do
    warm="$(hivectl --json boxes 2>/dev/null | jq '[.[].pools[].warm] | add // 0' 2>/dev/null || echo 0)"
    [ "${warm:-0}" -ge "$want" ] && break
    sleep 0.5
  done
  hivectl boxes >&2 || true
  log "smoke: sending the signed push"
  reply="$(bash -c "$curl_line")" || die "webhook request failed"
  echo "$reply" >&2
  build_id="$(echo "$reply" | grep -oE '"(build_id|id)" *: *"[^"]+"' | head -n1 | sed -E 's/.*: *"([^"]+)"/\1/')"
  [ -n "$build_id" ] || die "no build id in the webhook reply: $reply"
  log "smoke: following build $build_id"
  rc=0
  timeout 300 "$bin/hivectl" --addr "$grpc_url" logs -f "$build_id" || rc=$?
  hivectl build "$build_id" >&2 || true
  [ "$rc" = 0 ] || die "smoke: build $build_id did not succeed (hivectl logs -f exited $rc)"
  log "smoke: PASS (build $build_id succeeded)"
  exit 0
fi

cat <<EOF

Local hive is up. (Ctrl-C stops everything.)

hivectl needs the admin token (made on the first start; keep it like a password):
  export HIVE_TOKEN=\$(cat $token_file)

  dashboard      $http_url/ui/   (sign in with the same token: paste the contents of $token_file)
  control plane  $http_url (webhook), grpc $grpc_url   log: $logs/control-plane.log
  box            $(if [ "$microvm" = 1 ]; then echo "microvm backend in the emulated KVM host, pool $pool   log: kvm-host.sh exec --ctl $data_dir/l1-ctl.sock -- cat /var/log/start.log"; else echo "sandbox backend, pool $pool                          log: $logs/box.log"; fi)
  git host       $repo_url (netns hive-th-git)

Send a signed push (the HMAC is computed with openssl from the project secret):
  $curl_line

Follow the build (its id is in the webhook reply):
  $hivectl_line logs -f <build-id>
  $hivectl_line builds
  $hivectl_line boxes

EOF
if [ "$microvm" = 1 ]; then wait "$cp_pid" "$l1_pid" || true; else wait "$cp_pid" "$box_pid" || true; fi
log "a daemon exited on its own; see $logs"
