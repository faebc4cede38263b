#!/usr/bin/env bash
# Interop across the mesh: two real `impmesh` processes (clusters A and B), peered with
# `impmesh peer add` / `peer accept`, and slixmpp accounts homed on each
# (ops/interop/mesh.py), with group chat in a room of one cluster entered from the
# other. Uses the venv that run.sh creates. Exits non-zero on failure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
bin="${IMPMESH_BIN:-$root/target/debug/impmesh}"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'slixmpp>=1.8' 'aiohttp>=3.9'
fi
if [ ! -x "$bin" ]; then
  (cd "$root" && cargo build --quiet --bin impmesh)
fi

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

read -r -a ports < <("$venv/bin/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(12)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)

password="mesh-$RANDOM-pw"
axl_password="axl-$RANDOM-secret"
i=0
for c in a b; do
  c2s=${ports[$i]}; tls=${ports[$((i+1))]}; https=${ports[$((i+2))]}; links=${ports[$((i+3))]}
  admin=${ports[$((i+4))]}; upload=${ports[$((i+5))]}
  i=$((i+6))
  cat > "$work/$c.toml" <<TOML
domain = "localhost"
data_dir = "$work/$c"
[node]
name = "node1.cluster-$c.example.com"
cluster = "cluster-$c.example.com"
# What see-other-host and peers name: a name in the node certificate (slixmpp checks
# the name it is sent to against it).
host = "localhost"
[listen]
c2s = ["127.0.0.1:$c2s"]
c2s_direct_tls = ["127.0.0.1:$tls"]
https = "127.0.0.1:$https"
admin = "127.0.0.1:$admin"
links = "127.0.0.1:$links"
client_https = "127.0.0.1:$upload"
turn = "127.0.0.1:0"
turns = "127.0.0.1:0"
[muc]
enabled = true
TOML
  eval "c2s_$c=$c2s; https_$c=$https"
  echo "$axl_password" | "$bin" --config "$work/$c.toml" axl-user set icsync --password-stdin
done
echo "$password" | "$bin" --config "$work/a.toml" user add alice --password-stdin
echo "$password" | "$bin" --config "$work/b.toml" user add bob --password-stdin

for c in a b; do
  "$bin" --config "$work/$c.toml" serve > "$work/$c.log" 2>&1 &
  pids+=($!)
done
for c in a b; do
  port_var="c2s_$c"
  for _ in $(seq 1 100); do
    grep -q "listening for XMPP clients on 127.0.0.1:${!port_var}" "$work/$c.log" 2>/dev/null && break
    sleep 0.1
  done
done

# The admins' part: A adds B, B accepts A.
echo "$axl_password" | "$bin" --config "$work/a.toml" peer add "127.0.0.1:$https_b" --user icsync --password-stdin
"$bin" --config "$work/b.toml" peer accept cluster-a.example.com
synced() {
  "$bin" --config "$work/$1.toml" peer status --json \
    | "$venv/bin/python" -c 'import json,sys; p=json.load(sys.stdin); sys.exit(0 if p and p[0]["associated_users"] == 1 else 1)'
}
for _ in $(seq 1 100); do
  synced a && synced b && break
  sleep 0.2
done
synced a && synced b || { echo "FAIL: the clusters did not sync"; tail -20 "$work/a.log" "$work/b.log"; exit 1; }
echo "ok: clusters A and B peered and in sync"

cat "$work/a/certs/node.crt" "$work/b/certs/node.crt" > "$work/ca.pem"
if ! (cd "$here" && SSL_CERT_FILE="$work/ca.pem" "$venv/bin/python" mesh.py 127.0.0.1 "$c2s_a" "$c2s_b" "$work/ca.pem" "$password" ${MESH_VERBOSE:-}); then
  echo "--- A ---"; tail -30 "$work/a.log"; echo "--- B ---"; tail -30 "$work/b.log"
  exit 1
fi
status="$("$bin" --config "$work/a.toml" peer status)"
for expected in "router link out  node1.cluster-b.example.com up" \
  "failures:         0 in a row, 0 stall restarts, 0 directory entries refused" \
  "clock skew:       +0 s" "DNS:              " "protocol:         2, features"; do
  grep -qF "$expected" <<<"$status" \
    || { echo "FAIL: peer status does not show \"$expected\""; echo "$status"; exit 1; }
done
echo "interop (mesh): 1 passed, 0 failed"
