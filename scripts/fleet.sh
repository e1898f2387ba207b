#!/usr/bin/env bash
# A fleet on this machine: Redis, two `tollgate store` replicas and three Envoys running
# examples/envoy/fleet.yaml in front of the built-in mock provider. Every limit is exact across
# the three Envoys (README "Running a fleet"). Listens on 127.0.0.1:${TOLLGATE_PORT:-10000}, +1, +2.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TOLLGATE_PORT:-10000}

bash scripts/setup.sh envoy
bash scripts/setup.sh redis
echo "[fleet] building filter.wasm, the tollgate binary and the mock provider..." >&2
cargo build --quiet -p tollgate-filter --target wasm32-unknown-unknown --profile wasm
cargo build --quiet --release -p tollgate-cli -p tollgate-mock-provider
WASM="$PWD/target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm"
ENVOY=$(bash scripts/envoy-bin.sh)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # URL WHAT
  for _ in $(seq 100); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "[fleet] $2 did not become ready ($1)" >&2
  exit 1
}

# The policy every Envoy and every replica runs: the one in fleet.yaml.
python3 - examples/envoy/fleet.yaml > "$WORK/policy.json" <<'PY'
import sys
lines = open(sys.argv[1]).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.strip() == "value: |" and "StringValue" in lines[i - 1])
indent = len(lines[start]) - len(lines[start].lstrip())
body = []
for l in lines[start + 1:]:
    if l.strip() and len(l) - len(l.lstrip()) <= indent:
        break
    body.append(l)
print("\n".join(body))
PY
./target/release/tollgate check "$WORK/policy.json" > /dev/null

REDIS_PORT=$(free_port)
redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK" --appendonly yes --appendfsync always \
  --save '' --daemonize no > "$WORK/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping > /dev/null 2>&1 && break; sleep 0.1; done

STORE_PORTS=()
for i in 0 1; do
  p=$(free_port)
  ./target/release/tollgate store --redis "redis://127.0.0.1:$REDIS_PORT" --listen "127.0.0.1:$p" \
    "$WORK/policy.json" > "$WORK/store-$i.log" 2>&1 &
  pids+=($!)
  STORE_PORTS+=("$p")
  wait_for "http://127.0.0.1:$p/healthz" "store replica $i"
done

MOCK_PORT=$(free_port)
./target/release/tollgate-mock-provider --port "$MOCK_PORT" > "$WORK/mock.log" 2>&1 &
pids+=($!)

ADMINS=()
for i in 0 1 2; do
  admin=$(free_port)
  ADMINS+=("$admin")
  sed -e "s#port_value: 10000#port_value: $((PORT + i))#" -e "s#port_value: 9901#port_value: $admin#" \
      -e "s#port_value: 8081#port_value: $MOCK_PORT#" \
      -e "s#port_value: 8089#port_value: ${STORE_PORTS[0]}#" -e "s#port_value: 8090#port_value: ${STORE_PORTS[1]}#" \
      -e "s#filename: target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm#filename: $WASM#" \
      examples/envoy/fleet.yaml > "$WORK/envoy-$i.yaml"
  "$ENVOY" -c "$WORK/envoy-$i.yaml" --concurrency 2 --log-level warn --component-log-level wasm:info \
    --base-id-path "$WORK/base-id-$i" --use-dynamic-base-id > "$WORK/envoy-$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do wait_for "http://127.0.0.1:${ADMINS[$i]}/ready" "Envoy $i"; done

cat <<MSG

A Tollgate fleet is running on this machine:
  Envoys:          http://127.0.0.1:$PORT  http://127.0.0.1:$((PORT + 1))  http://127.0.0.1:$((PORT + 2))
  store replicas:  http://127.0.0.1:${STORE_PORTS[0]}  http://127.0.0.1:${STORE_PORTS[1]}  (GET /stats, /healthz)
  Redis:           127.0.0.1:$REDIS_PORT (AOF in $WORK)
  provider:        the built-in mock (127.0.0.1:$MOCK_PORT)
Policy: examples/envoy/fleet.yaml (free tier: 5 requests/minute, 50/day per x-tollgate-user), one
budget across all three Envoys. Send 6 requests round the fleet; the sixth is refused:

  for i in 0 1 2 3 4 5; do curl -s -o /dev/null -w '%{http_code}\\n' http://127.0.0.1:\$(($PORT + i % 3))/v1/chat/completions \\
       -H 'content-type: application/json' -H 'x-tollgate-user: alice' \\
       -d '{"model":"mock-model","messages":[{"role":"user","content":"Hi"}]}'; done

Envoy admin (stats: wasmcustom.tollgate_*): http://127.0.0.1:${ADMINS[0]}/stats?filter=tollgate
Ctrl-C to stop.
MSG
wait "${pids[@]}"
