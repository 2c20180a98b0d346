#!/usr/bin/env bash
# Test hosts that stand for "the public internet" on this machine.
#
# Each test host is its own network namespace `hive-th-<name>` with one address in
# 198.18.0.0/15 (RFC 2544 benchmarking range: not private, so cells are allowed to reach it,
# and never routed on the real internet). All test hosts hang off one bridge `hive-pub0` in the
# root namespace, which holds 198.18.0.1/15 and is the hosts' default gateway. Traffic a box
# NATs out of its cells therefore reaches them through ordinary routing, exactly like egress to
# a public server would.
#
#   198.18.0.1   the bridge (root netns: the box's "uplink")
#   198.18.0.2   by convention the git host (`git daemon` on port 9418)
set -euo pipefail

bridge="hive-pub0"
gateway="198.18.0.1"
prefix_len=15

usage() {
  cat <<USAGE
Usage:
  $(basename "$0") up   --name NAME --addr 198.18.X.Y [--git-root DIR]
  $(basename "$0") down --name NAME
  $(basename "$0") list
  $(basename "$0") exec --name NAME -- CMD...

Create or remove a "public internet" test host: network namespace hive-th-NAME with address
ADDR/15 on bridge $bridge ($gateway/15 in the root netns, the hosts' default route).

  up      create the host (idempotent). With --git-root, also serve DIR read-only with
          'git daemon' on ADDR:9418 (export-all), so git://ADDR/<repo>.git works.
          Prints HIVE_TEST_HOST_NETNS=hive-th-NAME and HIVE_TEST_HOST_ADDR=ADDR.
  down    stop its git daemon, delete the namespace; the bridge goes with the last host.
  list    the test hosts that exist.
  exec    run CMD inside the host's namespace.

NAME: 1-8 characters of a-z 0-9 (interface names are limited to 15 bytes).
ADDR must lie in 198.18.0.0/15 and must not be $gateway. Needs root and iproute2.
USAGE
}

die() { echo "test-host: error: $*" >&2; exit 1; }
log() { echo "test-host: $*" >&2; }

cmd="${1:-}"
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift
case "$cmd" in -h|--help|help) usage; exit 0 ;; esac

name="" addr="" git_root=""
exec_argv=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) [ $# -ge 2 ] || die "--name needs a value"; name="$2"; shift ;;
    --addr) [ $# -ge 2 ] || die "--addr needs a value"; addr="$2"; shift ;;
    --git-root) [ $# -ge 2 ] || die "--git-root needs a directory"; git_root="$2"; shift ;;
    --) shift; exec_argv=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
command -v ip >/dev/null || die "'ip' not found (apt-get install iproute2)"

check_name() {
  [ -n "$name" ] || die "--name is required"
  [[ "$name" =~ ^[a-z0-9]{1,8}$ ]] || die "--name '$name': use 1-8 characters of a-z 0-9"
}

# in_benchmark_range ADDR: true when ADDR is a dotted quad inside 198.18.0.0/15.
in_benchmark_range() {
  local a="$1" o1 o2 o3 o4
  [[ "$a" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
  o1="${BASH_REMATCH[1]}" o2="${BASH_REMATCH[2]}" o3="${BASH_REMATCH[3]}" o4="${BASH_REMATCH[4]}"
  [ "$o3" -le 255 ] && [ "$o4" -le 255 ] && [ "$o1" = 198 ] && { [ "$o2" = 18 ] || [ "$o2" = 19 ]; }
}

ns_of() { echo "hive-th-$1"; }
pidfile_of() { echo "/run/hive-test-hosts/$1.git-daemon.pid"; }

ensure_bridge() {
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    log "created bridge $bridge"
  fi
  ip addr replace "$gateway/$prefix_len" dev "$bridge"
  ip link set "$bridge" up
}

stop_git_daemon() {
  local pf pid
  pf="$(pidfile_of "$1")"
  [ -f "$pf" ] || return 0
  pid="$(cat "$pf")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pf"
}

cmd_up() {
  check_name
  [ -n "$addr" ] || die "--addr is required"
  in_benchmark_range "$addr" || die "--addr '$addr' is not an address in 198.18.0.0/15"
  [ "$addr" != "$gateway" ] || die "--addr $gateway is the bridge's own address"
  if [ -n "$git_root" ]; then
    [ -d "$git_root" ] || die "--git-root '$git_root' is not a directory"
    git_root="$(cd "$git_root" && pwd)"
    command -v git >/dev/null || die "'git' not found (apt-get install git)"
  fi
  local ns host_if peer_if
  ns="$(ns_of "$name")"
  host_if="thv-$name"
  peer_if="eth0"
  ensure_bridge
  if ! ip netns list | grep -qw "^$ns"; then
    ip netns add "$ns"
    log "created netns $ns"
  fi
  if ! ip link show "$host_if" >/dev/null 2>&1; then
    ip link add "$host_if" type veth peer name "$peer_if" netns "$ns"
  fi
  ip link set "$host_if" master "$bridge" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr flush dev "$peer_if"
  ip -n "$ns" addr add "$addr/$prefix_len" dev "$peer_if"
  ip -n "$ns" link set "$peer_if" up
  ip -n "$ns" route replace default via "$gateway"

  if [ -n "$git_root" ]; then
    mkdir -p /run/hive-test-hosts
    stop_git_daemon "$name"
    # --reuseaddr: a quick down/up must not trip over TIME_WAIT. Read-only: no receive-pack.
    # 8>&-: the daemon must not inherit the lock below, or it would hold it for its lifetime.
    ip netns exec "$ns" git daemon --detach --reuseaddr --export-all \
      --base-path="$git_root" --listen="$addr" --port=9418 \
      --pid-file="$(pidfile_of "$name")" "$git_root" 8>&-
    # Ready when the port accepts connections (git daemon --detach returns before bind).
    local ok=0
    for _ in $(seq 50); do
      if ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$addr/9418" 2>/dev/null; then ok=1; break; fi
      sleep 0.1
    done
    [ "$ok" = 1 ] || die "git daemon in $ns did not start listening on $addr:9418"
    log "git daemon serving $git_root at git://$addr/"
  fi
  echo "HIVE_TEST_HOST_NETNS=$ns"
  echo "HIVE_TEST_HOST_ADDR=$addr"
}

cmd_down() {
  check_name
  local ns
  ns="$(ns_of "$name")"
  stop_git_daemon "$name"
  if ip netns list | grep -qw "^$ns"; then
    # Anything else still running in the namespace goes with it.
    local pids
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    ip netns del "$ns"
    log "deleted netns $ns"
  fi
  ip link del "thv-$name" 2>/dev/null || true
  if ip link show "$bridge" >/dev/null 2>&1 && [ -z "$(ip -o link show master "$bridge" 2>/dev/null)" ]; then
    ip link del "$bridge"
    log "deleted bridge $bridge (no hosts left)"
  fi
}

cmd_list() {
  ip netns list | awk '{print $1}' | grep '^hive-th-' | while read -r ns; do
    echo "${ns#hive-th-} $(ip -n "$ns" -o -4 addr show dev eth0 2>/dev/null | awk '{print $4}')"
  done
}

cmd_exec() {
  check_name
  [ "${#exec_argv[@]}" -gt 0 ] || die "exec needs a command after --"
  exec ip netns exec "$(ns_of "$name")" "${exec_argv[@]}"
}

# up/down of different hosts may run at once (parallel tests): one at a time, so a host's
# "down" cannot delete the shared bridge while another host's "up" is joining it.
# The git daemon is stopped before taking the lock: one started by an older version of this
# script may hold the lock itself.
if [ "$cmd" = down ]; then
  check_name
  stop_git_daemon "$name"
fi
if [ "$cmd" = up ] || [ "$cmd" = down ]; then
  exec 8>/run/hive-test-hosts.lock
  flock -w 120 8 || die "another test-host.sh held /run/hive-test-hosts.lock for 120s"
fi

case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  list) cmd_list ;;
  exec) cmd_exec ;;
  *) die "unknown command '$cmd' (up, down, list, exec; see --help)" ;;
esac
