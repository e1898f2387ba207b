#!/usr/bin/env bash
# Envoy throughput and latency with vs without the Tollgate filter, against the mock provider,
# measured in one run (results recorded in BENCHMARKS.md).
#
#   scripts/bench-envoy.sh [SECONDS_PER_ROUND] [ROUNDS]      (defaults: 10, 3)
#
# Both Envoys run the repository's envoy.yaml (--concurrency 2); "without" has the wasm filter
# removed, "with" counts every request (one hot identity, limits far above the load, so every
# request does the full check-and-count CAS on shared data and is allowed). Rounds alternate
# between the two so that machine noise hits both alike; wrk: 1 thread, 16 connections,
# keep-alive, POST /v1/chat/completions. Needs wrk (apt-get install wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
ROUNDS=${2:-3}
command -v wrk >/dev/null || { echo "bench: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
bash scripts/setup.sh envoy
bash scripts/build-wasm.sh
cargo build --quiet --release -p tollgate-mock-provider
ENVOY=$(bash scripts/envoy-bin.sh)
WASM="$PWD/target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm"
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

./target/release/tollgate-mock-provider > "$WORK/mock.out" &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
MOCK_PORT=$(sed -n 's#listening on http://127.0.0.1:##p' "$WORK/mock.out")

python3 - "$WORK" "$MOCK_PORT" "$WASM" <<'PY'
import socket, sys
work, mock_port, wasm = sys.argv[1], sys.argv[2], sys.argv[3]
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
src = open("envoy.yaml").read()
policy = '''{
  "identity": { "header": "x-tollgate-user" },
  "tier": { "default": "free" },
  "tiers": { "free": { "limits": [ { "window": "minute", "requests": 1000000000000 }, { "window": "day", "requests": 1000000000000 } ] } }
}'''
start = src.index("value: |\n") + len("value: |\n")
end = src.index("                vm_config:")
with_filter = src[:start] + "".join("                    " + l + "\n" for l in policy.splitlines()) + src[end:]
a = with_filter.index("          - name: tollgate\n")
b = with_filter.index("          - name: envoy.filters.http.router")
without = with_filter[:a] + with_filter[b:]
for name, text in (("with", with_filter), ("without", without)):
    lp, ap = free(), free()
    text = (text.replace("port_value: 10000", f"port_value: {lp}").replace("port_value: 9901", f"port_value: {ap}")
                .replace("port_value: 8081", f"port_value: {mock_port}")
                .replace("filename: target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm", f"filename: {wasm}"))
    open(f"{work}/{name}.yaml", "w").write(text)
    open(f"{work}/{name}.port", "w").write(str(lp))
    open(f"{work}/{name}.admin", "w").write(str(ap))
PY

cat > "$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"mock-model","messages":[{"role":"user","content":"Hi"}]}'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-tollgate-user"] = "bench-user"
LUA

run_round() { # name seconds -> "rps p50_ms p99_ms"
  local name=$1 secs=$2 port admin pid out
  port=$(cat "$WORK/$name.port"); admin=$(cat "$WORK/$name.admin")
  "$ENVOY" -c "$WORK/$name.yaml" --concurrency 2 --log-level error --base-id-path "$WORK/$name.base" --use-dynamic-base-id &
  pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$admin/ready" && break; sleep 0.1; done
  wrk -t1 -c16 -d2s -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions" > /dev/null   # warm-up
  out=$(wrk -t1 -c16 -d"${secs}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then echo "bench: $name had non-2xx responses:" >&2; echo "$out" >&2; exit 1; fi
  to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v/=1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v*=1000 }; printf "%.2f", v }'; }
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}' | to_ms)
  p99=$(echo "$out" | awk '$1=="99%" {print $2}' | to_ms)
  echo "$rps $p50 $p99"
}

echo "| round | without filter: req/s | p50 ms | p99 ms | with filter: req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|---|"
for r in $(seq "$ROUNDS"); do
  read -r a_rps a_p50 a_p99 < <(run_round without "$SECS")
  read -r b_rps b_p50 b_p99 < <(run_round with "$SECS")
  echo "| $r | $a_rps | $a_p50 | $a_p99 | $b_rps | $b_p50 | $b_p99 |"
done
echo
echo "filter.wasm: $(stat -c %s "$WASM") bytes ($(gzip -9c "$WASM" | wc -c) gzipped); $(nproc) cores; $("$ENVOY" --version | grep -o '1\.[0-9]*\.[0-9]*' | head -1); wrk -t1 -c16, ${SECS}s rounds"
