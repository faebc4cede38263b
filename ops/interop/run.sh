#!/usr/bin/env bash
# Interop: a real `impmesh` process with stock clients: two slixmpp accounts
# (ops/interop/scenario.py), then xmpp.js speaking SASL2, Bind 2 and FAST
# (ops/interop/fast.mjs), then coturn's turnutils_uclient relaying through the node's
# TURN relay with the credentials slixmpp got through XEP-0215 (ops/interop/turn.py). Creates a venv with slixmpp from PyPI and installs xmpp.js
# from npm, builds impmesh if needed, starts it on free loopback ports with a fresh
# data directory, runs the scenarios, and stops the server. Exits non-zero on any failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
bin="${IMPMESH_BIN:-$root/target/debug/impmesh}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check 'slixmpp>=1.8' 'aiohttp>=3.9'
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --quiet --bin impmesh)
fi
# xmpp.js for the SASL2 / FAST scenario, at the version package-lock.json pins.
command -v node >/dev/null || { echo "FAIL: the xmpp.js scenario needs Node.js 20.10 or later"; exit 1; }
(cd "$here" && npm ci --silent --no-audit --no-fund)
# coturn's TURN client for the relay scenario (Debian's coturn package).
# tcpdump to see the relay's DSCP class on the wire.
if ! command -v turnutils_uclient >/dev/null || ! command -v tcpdump >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends coturn tcpdump >/dev/null
fi

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

read -r c2s tls https links admin upload turn turns < <("$venv/bin/python" - <<'PY'
import socket
ports = []
socks = []
for _ in range(8):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); ports.append(s.getsockname()[1]); socks.append(s)
print(*ports)
PY
)
cat > "$work/impmesh.toml" <<TOML
domain = "localhost"
data_dir = "$work/data"
[listen]
c2s = ["127.0.0.1:$c2s"]
c2s_direct_tls = ["127.0.0.1:$tls"]
https = "127.0.0.1:$https"
admin = "127.0.0.1:$admin"
links = "127.0.0.1:$links"
client_https = "127.0.0.1:$upload"
turn = "127.0.0.1:$turn"
turns = "127.0.0.1:$turns"
[media]
# The two uclient sessions relay to each other's relayed addresses, on loopback.
allow_peers = ["127.0.0.0/8"]
[limits]
# Every scenario's client comes from 127.0.0.1: the failed logins the FAST scenario
# makes on purpose (revoked tokens, retries) must not lock the next scenario out.
login_failures = 1000
TOML

password="interop-$RANDOM-pw"
for user in alice bob; do
  echo "$password" | "$bin" --config "$work/impmesh.toml" user add "$user" --password-stdin
done

"$bin" --config "$work/impmesh.toml" serve > "$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q "listening for XMPP clients on 127.0.0.1:$c2s" "$work/server.log" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; echo "FAIL: impmesh exited"; exit 1; }
  sleep 0.1
done

# The running node keeps transparent huge pages off (src/trim.rs: freed memory
# goes back to the system); the kernel reports it per process.
if grep -q '^THP_enabled:' "/proc/$server_pid/status" \
  && ! grep -q '^THP_enabled:[[:space:]]*0' "/proc/$server_pid/status"; then
  echo "FAIL: transparent huge pages are on for the node"; exit 1
fi

if ! SSL_CERT_FILE="$work/data/certs/node.crt" "$venv/bin/python" "$here/scenario.py" 127.0.0.1 "$c2s" "$work/data/certs/node.crt" "$password"; then
  echo "--- server log ---"; tail -50 "$work/server.log"
  exit 1
fi

# xmpp.js: SASL2, Bind 2 and FAST tokens (ops/interop/fast.mjs).
if ! NODE_EXTRA_CA_CERTS="$work/data/certs/node.crt" node "$here/fast.mjs" 127.0.0.1 "$c2s" localhost "$password" "$bin" "$work/impmesh.toml"; then
  echo "--- server log ---"; tail -50 "$work/server.log"
  exit 1
fi

# The relay: credentials from XEP-0215 (slixmpp), then coturn's client allocates with
# them, over UDP, TCP and TLS, and two sessions relay packets to each other.
if ! creds="$(SSL_CERT_FILE="$work/data/certs/node.crt" "$venv/bin/python" "$here/turn.py" 127.0.0.1 "$c2s" "$work/data/certs/node.crt" "$password" | tail -1)"; then
  echo "--- server log ---"; tail -50 "$work/server.log"
  exit 1
fi
read -r turn_host turn_port turn_user turn_password turns_port <<< "$creds"
[ "$turn_port" = "$turn" ] || { echo "FAIL: XEP-0215 named port $turn_port, the relay is on $turn"; exit 1; }
[ "$turns_port" = "$turns" ] || { echo "FAIL: XEP-0215 named TLS port $turns_port, the relay is on $turns"; exit 1; }
for transport in udp tcp tls; do
  flags=(-p "$turn_port")
  [ "$transport" = tcp ] && flags=(-t -p "$turn_port")
  # Relayed packets leave marked EF (DSCP 46: the TOS byte's top six bits, 0xb8),
  # from a relayed port (the relay's range, not its listening port).
  capture=""
  if [ "$transport" = udp ]; then
    timeout 60 tcpdump -i lo -n -c 1 "udp and (ip[1] & 0xfc) = 0xb8 and src portrange 49152-65535 and not src port $turn_port" >"$work/dscp.txt" 2>"$work/tcpdump.err" &
    capture=$!
    # Capturing once it says so.
    for _ in $(seq 100); do grep -q "listening on" "$work/tcpdump.err" && break; sleep 0.1; done
  fi
  # TLS, checking the node's certificate.
  [ "$transport" = tls ] && flags=(-t -S -E "$work/data/certs/node.crt" -p "$turns_port")
  out="$(timeout 60 turnutils_uclient "${flags[@]}" -y -n 50 -m 1 -u "$turn_user" -w "$turn_password" "$turn_host" 2>&1)" \
    || { echo "$out" | tail -20; echo "FAIL: turnutils_uclient over $transport"; exit 1; }
  if ! echo "$out" | grep -q "Total lost packets 0 (0.000000%)" \
     || ! echo "$out" | grep -q "start_mclient: tot_send_msgs=200, tot_recv_msgs=200"; then
    echo "$out" | tail -20; echo "FAIL: packets lost through the relay over $transport"; exit 1
  fi
  echo "ok: turnutils_uclient relays 200 of 200 packets (RTP and RTCP, both ways) over $transport"
  if [ -n "$capture" ]; then
    wait "$capture" || { echo "FAIL: no relayed packet marked DSCP EF (46) seen on loopback"; exit 1; }
    echo "ok: relayed packets are marked DSCP EF: $(head -1 "$work/dscp.txt" | cut -c1-100)"
  fi
done

# A clean shutdown on SIGTERM.
kill -TERM "$server_pid"
if ! timeout 15 tail --pid="$server_pid" -f /dev/null; then
  echo "FAIL: impmesh did not stop within 15 s of SIGTERM"; exit 1
fi
wait "$server_pid" || { echo "FAIL: impmesh exited non-zero after SIGTERM"; tail -20 "$work/server.log"; exit 1; }
server_pid=""
echo "interop: 3 passed, 0 failed"
