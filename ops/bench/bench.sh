#!/usr/bin/env bash
# Comparison benchmark of impmesh, ejabberd 23.01 and Prosody 0.12 (Debian) on this
# machine, loopback only, with the same load generator (impmesh-bench) for all three.
# The server runs on CPU $SRV_CPU, the generator on CPU $GEN_CPU: single-core figures,
# as in shared/anchors/performance.md.
#
# usage: bench.sh install                    # apt-get install ejabberd prosody; stop their services
#        bench.sh setup                      # configs and a test certificate under $RUNDIR
#        bench.sh start impmesh|ejabberd|prosody
#        bench.sh stop
#        bench.sh wipe impmesh|ejabberd|prosody   # forget the accounts
#        bench.sh gen ARGS...                # impmesh-bench pinned to $GEN_CPU, --pid set
#        bench.sh suite [ROUNDS] [SERVERS...] # the whole scenario; JSON lines to $RUNDIR/results.jsonl
#        bench.sh pairs [ROUNDS] [SERVERS...] # 500 msgs/s latency, servers interleaved round by round
#        bench.sh archive [ROUNDS]           # impmesh with message archives on and off, interleaved
#        bench.sh turn [ROUNDS]              # impmesh's TURN relay beside coturn (Debian's), interleaved
#        bench.sh rooms [ROUNDS] [SERVERS...] # chat rooms of 10, 100, 1,000: saturation and fan-out
#
# Environment: PORT (15222), TURN_PORT (13478), RUNDIR (/tmp/impmesh-bench), SRV_CPU (1), GEN_CPU (0);
# BUSY_CPUS=1 keeps every CPU from going idle during `pairs` (one SCHED_IDLE spinner per
# CPU, which runs only when nothing else wants that CPU): on a virtual machine whose
# idle vCPUs halt, this takes the hypervisor's wake-up delay out of the latency
# (docs/benchmarks.md, "Latency at 500 msgs/s").
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
RUNDIR="${RUNDIR:-/tmp/impmesh-bench}"
SRV_CPU="${SRV_CPU:-1}"
GEN_CPU="${GEN_CPU:-0}"
PORT="${PORT:-15222}"
TURN_PORT="${TURN_PORT:-13478}"
IMPMESH="${IMPMESH:-$ROOT/target/release/impmesh}"
GEN="${GEN:-$ROOT/target/release/impmesh-bench}"

subst() { sed -e "s#@RUNDIR@#$RUNDIR#g" -e "s#@PORT@#$PORT#g" -e "s#@TURN_PORT@#$TURN_PORT#g" "$1" > "$2"; }

install() {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ejabberd prosody >/dev/null
  service ejabberd stop >/dev/null 2>&1 || true
  service prosody stop >/dev/null 2>&1 || true
}

setup() {
  mkdir -p "$RUNDIR"/ejabberd/{log,spool} "$RUNDIR"/prosody/{data,certs} "$RUNDIR"/impmesh
  if [ ! -f "$RUNDIR/bench.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -subj "/CN=bench.local" -addext "subjectAltName=DNS:bench.local" \
      -keyout "$RUNDIR/bench.key" -out "$RUNDIR/bench.crt" 2>/dev/null
    cat "$RUNDIR/bench.key" "$RUNDIR/bench.crt" > "$RUNDIR/bench.pem"
  fi
  cp "$RUNDIR/bench.crt" "$RUNDIR/prosody/certs/bench.local.crt"
  cp "$RUNDIR/bench.key" "$RUNDIR/prosody/certs/bench.local.key"
  subst "$HERE/ejabberd.yml.in" "$RUNDIR/ejabberd/ejabberd.yml"
  subst "$HERE/ejabberdctl.cfg.in" "$RUNDIR/ejabberd/ejabberdctl.cfg"
  cp /etc/ejabberd/inetrc "$RUNDIR/ejabberd/inetrc"
  subst "$HERE/prosody.cfg.lua.in" "$RUNDIR/prosody/prosody.cfg.lua"
  subst "$HERE/impmesh.toml.in" "$RUNDIR/impmesh/impmesh.toml"
  chown ejabberd:ejabberd "$RUNDIR/bench.pem"
  chmod 600 "$RUNDIR/bench.pem"
  chown -R ejabberd:ejabberd "$RUNDIR/ejabberd"
  chown -R prosody:prosody "$RUNDIR/prosody"
  echo "setup done in $RUNDIR"
}

port_pid() {
  ss -ltnpH "src 127.0.0.1:$PORT" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}

wait_port() {
  for _ in $(seq 1 120); do
    p=$(port_pid); [ -n "$p" ] && { echo "$p"; return 0; }; sleep 0.5
  done
  echo "server did not come up" >&2; return 1
}

start() {
  [ -z "$(port_pid)" ] || { echo "port $PORT busy" >&2; exit 1; }
  ulimit -Hn 1048576 2>/dev/null || true   # root: room for 100,000 connections
  ulimit -n "$(ulimit -Hn)"
  case "$1" in
    impmesh)
      (taskset -c "$SRV_CPU" "$IMPMESH" --config "$RUNDIR/impmesh/impmesh.toml" serve \
        >"$RUNDIR/impmesh/console.log" 2>&1 &) ;;
    ejabberd)
      (cd "$RUNDIR/ejabberd" && HOME="$RUNDIR/ejabberd" setpriv --reuid ejabberd --regid ejabberd --init-groups \
        taskset -c "$SRV_CPU" ejabberdctl --config-dir "$RUNDIR/ejabberd" --logs "$RUNDIR/ejabberd/log" \
        --spool "$RUNDIR/ejabberd/spool" foreground >"$RUNDIR/ejabberd/log/console.log" 2>&1 &) ;;
    prosody)
      (cd "$RUNDIR/prosody" && HOME="$RUNDIR/prosody" setpriv --reuid prosody --regid prosody --init-groups \
        taskset -c "$SRV_CPU" prosody -F --config "$RUNDIR/prosody/prosody.cfg.lua" \
        >"$RUNDIR/prosody/console.log" 2>&1 &) ;;
    *) echo "unknown server $1" >&2; exit 2 ;;
  esac
  pid=$(wait_port)
  echo "$1 $pid" > "$RUNDIR/server.pid"
  sleep 3
  echo "$1 pid=$pid rss_kib=$(awk '/VmRSS/{print $2}' /proc/$pid/status) cpus=$(taskset -pc $pid | sed 's/.*: //')"
}

wipe() {  # forget a server's accounts and state
  case "$1" in
    impmesh) rm -rf "$RUNDIR/impmesh/data" ;;
    ejabberd) rm -rf "$RUNDIR/ejabberd/spool"; mkdir -p "$RUNDIR/ejabberd/spool"; chown ejabberd:ejabberd "$RUNDIR/ejabberd/spool" ;;
    prosody) rm -rf "$RUNDIR/prosody/data"; mkdir -p "$RUNDIR/prosody/data"; chown prosody:prosody "$RUNDIR/prosody/data" ;;
  esac
}

stop() {
  [ -f "$RUNDIR/server.pid" ] || { echo "nothing started"; return 0; }
  read -r name pid < "$RUNDIR/server.pid"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$RUNDIR/server.pid"
  echo "stopped $name ($pid)"
}

gen() {
  ulimit -Hn 1048576 2>/dev/null || true   # root: room for 100,000 connections
  ulimit -n "$(ulimit -Hn)"
  pid=0; [ -f "$RUNDIR/server.pid" ] && read -r _ pid < "$RUNDIR/server.pid"
  taskset -c "$GEN_CPU" "$GEN" --addr "127.0.0.1:$PORT" --domain bench.local --starttls --pid "$pid" "$@"
}

suite() {
  local rounds="${1:-1}"; shift || true
  local servers=("$@"); [ ${#servers[@]} -eq 0 ] && servers=(impmesh ejabberd prosody)
  local out="$RUNDIR/results.jsonl"
  tag() { sed "s/^{/{\"server\":\"$1\",\"round\":$2,/" | tee -a "$out"; }
  for r in $(seq 1 "$rounds"); do
    for s in "${servers[@]}"; do
      echo "=== round $r: $s" >&2
      wipe "$s"
      start "$s" >&2
      gen --count 10000 --concurrency 100 register >/dev/null
      stop >&2; start "$s" >&2   # fresh process: registration leaves garbage behind
      gen --count 10000 --concurrency 100 --label idle10k idle --settle 5 --after-close 60 | tag "$s" "$r"
      stop >&2; start "$s" >&2
      gen --count 2000 --concurrency 50 --label login-starttls-scram login | tag "$s" "$r"
      gen --count 1000 --concurrency 50 --label msg-rate500 msg --rate 500 --warmup 3 --duration 20 | tag "$s" "$r"
      gen --count 1000 --concurrency 50 --label msg-saturate msg --window 4 --warmup 3 --duration 15 | tag "$s" "$r"
      stop >&2
    done
  done
}

BUSY_PIDS=()
trap busy_stop EXIT
online_cpus() {  # /sys/devices/system/cpu/online ("0-3,6") as one number per line
  local part
  for part in $(tr ',' ' ' < /sys/devices/system/cpu/online); do
    seq "${part%-*}" "${part#*-}"
  done
}

busy_start() {  # one spinner per CPU at the idle scheduling class
  BUSY_PIDS=()
  for c in $(online_cpus); do
    chrt --idle 0 taskset -c "$c" sh -c 'while :; do :; done' &
    BUSY_PIDS+=($!)
  done
}

busy_stop() {
  [ ${#BUSY_PIDS[@]} -eq 0 ] || kill "${BUSY_PIDS[@]}" 2>/dev/null || true
  BUSY_PIDS=()
}

pairs() {  # latency at 500 msgs/s, one run per server per round, interleaved
  local rounds="${1:-5}"; shift || true
  local servers=("$@"); [ ${#servers[@]} -eq 0 ] && servers=(impmesh ejabberd)
  local out="$RUNDIR/pairs.jsonl"
  local busy=0; [ "${BUSY_CPUS:-0}" = 1 ] && busy=1
  for s in "${servers[@]}"; do
    wipe "$s"; start "$s" >&2
    gen --count 1000 --concurrency 50 register >/dev/null
    stop >&2
  done
  for r in $(seq 1 "$rounds"); do
    for s in "${servers[@]}"; do
      echo "=== round $r: $s" >&2
      start "$s" >&2
      [ "$busy" = 1 ] && busy_start
      gen --count 1000 --concurrency 50 --label msg-rate500 msg --rate 500 --warmup 3 --duration 20 \
        --latency-log "$RUNDIR/latency-$s-$r.txt" \
        | sed "s/^{/{\"server\":\"$s\",\"round\":$r,\"busy_cpus\":$busy,/" | tee -a "$out"
      busy_stop
      stop >&2
    done
  done
}

archive() {  # impmesh's CPU per message with the archive (XEP-0313) on and off
  local rounds="${1:-3}"
  # Measured seconds per run: several of the writer's 5 s windows, so a window
  # stored just after the measurement ends weighs little (ARCHIVE_SECONDS to change).
  local seconds="${ARCHIVE_SECONDS:-30}"
  local out="$RUNDIR/archive.jsonl"
  local conf="$RUNDIR/impmesh/impmesh.toml"
  for r in $(seq 1 "$rounds"); do
    for mode in on off; do
      echo "=== round $r: archive $mode" >&2
      subst "$HERE/impmesh.toml.in" "$conf"
      [ "$mode" = off ] && printf '[archive]\nenabled = false            # BENCH: archive off\n' >> "$conf"
      wipe impmesh
      start impmesh >&2
      gen --count 1000 --concurrency 100 register >/dev/null
      for label in msg-saturate msg-rate1000; do
        case "$label" in
          msg-saturate) args=(msg --window 4 --warmup 6 --duration "$seconds") ;;
          msg-rate1000) args=(msg --rate 1000 --warmup 6 --duration "$seconds") ;;
        esac
        gen --count 1000 --concurrency 50 --label "$label" "${args[@]}" \
          | sed "s/^{/{\"server\":\"impmesh\",\"archive\":\"$mode\",\"round\":$r,/" | tee -a "$out"
      done
      stop >&2
    done
  done
  subst "$HERE/impmesh.toml.in" "$conf"
}

turn_pid() {
  ss -lunpH "src 127.0.0.1:$TURN_PORT" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}

# TURN credentials for impmesh's relay: the REST API's, minted with the secret the
# node made in its store (what XEP-0215 hands out), for one account holding every
# stream.
impmesh_turn_credentials() {
  python3 - "$RUNDIR/impmesh/data/impmesh.db" <<'PY'
import base64, hashlib, hmac, sqlite3, sys, time
row = sqlite3.connect(sys.argv[1]).execute(
    "SELECT secret FROM turn_secrets ORDER BY generation DESC LIMIT 1").fetchone()
user = f"{int(time.time()) + 7200}:bench"
key = bytes.fromhex(row[0])
print(user, base64.b64encode(hmac.new(key, user.encode(), hashlib.sha1).digest()).decode())
PY
}

turn() {  # the media relay: impmesh's beside coturn's, interleaved round by round
  local rounds="${1:-3}"
  local out="$RUNDIR/turn.jsonl"
  command -v turnserver >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn >/dev/null
  }
  mkdir -p "$RUNDIR/coturn"
  subst "$HERE/turnserver.conf.in" "$RUNDIR/coturn/turnserver.conf"
  # Both relays ask for 4 MiB socket buffers (coturn always has); the kernel's caps.
  sysctl -qw net.core.rmem_max=4194304 net.core.wmem_max=4194304
  local tgen=(taskset -c "$GEN_CPU" "$GEN")
  for r in $(seq 1 "$rounds"); do
    echo "=== round $r: direct (the loopback baseline)" >&2
    "${tgen[@]}" --label direct turn --direct --streams 1000 --pps 50 --duration 10 \
      | sed "s/^{/{\"server\":\"none\",\"round\":$r,/" | tee -a "$out"
    for s in impmesh coturn; do
      echo "=== round $r: $s" >&2
      local cred=(--username bench --turn-password benchpass) pid
      if [ "$s" = impmesh ]; then
        wipe impmesh; start impmesh >&2
        read -r _ pid < "$RUNDIR/server.pid"
        read -r user password < <(impmesh_turn_credentials)
        cred=(--username "$user" --turn-password "$password")
      else
        [ -z "$(turn_pid)" ] || { echo "port $TURN_PORT busy" >&2; exit 1; }
        (taskset -c "$SRV_CPU" turnserver -c "$RUNDIR/coturn/turnserver.conf" >"$RUNDIR/coturn/console.log" 2>&1 &)
        for _ in $(seq 1 60); do pid=$(turn_pid); [ -n "$pid" ] && break; sleep 0.5; done
        [ -n "$pid" ] || { echo "coturn did not come up" >&2; exit 1; }
        echo "coturn $pid" > "$RUNDIR/server.pid"
      fi
      # 1,000 voice streams (50,000 packets/s), then twice and four times the rate.
      for pps in 50 100 200; do
        "${tgen[@]}" --pid "$pid" --label "rate$((pps * 1000))" turn --relay "127.0.0.1:$TURN_PORT" \
          "${cred[@]}" --streams 1000 --pps "$pps" --duration 10 \
          | sed "s/^{/{\"server\":\"$s\",\"round\":$r,/" | tee -a "$out"
      done
      stop >&2
    done
  done
}

rooms() {  # chat rooms (XEP-0045): rooms of 10, 100, 1,000 at saturation, one message's fan-out
  local rounds="${1:-1}"; shift || true
  local servers=("$@"); [ ${#servers[@]} -eq 0 ] && servers=(impmesh ejabberd prosody)
  local out="$RUNDIR/rooms.jsonl"
  for s in "${servers[@]}"; do
    wipe "$s"; start "$s" >&2
    gen --count 1000 --concurrency 100 register >/dev/null
    stop >&2
  done
  # Every run on a fresh server process, each run in a room of its own.
  for r in $(seq 1 "$rounds"); do
    for s in "${servers[@]}"; do
      for n in 10 100 1000; do
        echo "=== round $r: $s, room of $n at saturation" >&2
        start "$s" >&2
        gen --count "$n" --concurrency 50 --label "room$n-saturate" room \
          --room "s$n-$r@conference.bench.local" --senders 10 --window 4 --warmup 3 --duration 10 \
          | sed "s/^{/{\"server\":\"$s\",\"round\":$r,/" | tee -a "$out"
        stop >&2
      done
      echo "=== round $r: $s, room of 1000, one sender at 5 messages/s" >&2
      start "$s" >&2
      gen --count 1000 --concurrency 50 --label room1000-rate5 room \
        --room "f1000-$r@conference.bench.local" --senders 1 --rate 5 --warmup 3 --duration 20 \
        | sed "s/^{/{\"server\":\"$s\",\"round\":$r,/" | tee -a "$out"
      stop >&2
    done
  done
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  setup) setup ;;
  start) start "$1" ;;
  stop) stop ;;
  wipe) wipe "$1" ;;
  gen) gen "$@" ;;
  suite) suite "$@" ;;
  pairs) pairs "$@" ;;
  archive) archive "$@" ;;
  turn) turn "$@" ;;
  rooms) rooms "$@" ;;
  *) sed -n '2,23p' "$0"; exit 2 ;;
esac
