#!/usr/bin/env bash
# The main job: Envoy with the Tollgate filter in front of a provider.
#   - no key set:          the built-in mock OpenAI-compatible provider (no API key needed)
#   - OPENAI_API_KEY set:  api.openai.com (examples/envoy/openai.yaml; the key stays in the env)
# Listens on 127.0.0.1:${TOLLGATE_PORT:-10000}. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${TOLLGATE_PORT:-10000}

bash scripts/setup.sh envoy
echo "[run] building filter.wasm and the mock provider..." >&2
bash scripts/build-wasm.sh
WASM="$PWD/target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm"
ENVOY=$(bash scripts/envoy-bin.sh)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ADMIN_PORT=$(free_port)
WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${OPENAI_API_KEY:-}" ]; then
  TEMPLATE=examples/envoy/openai.yaml
  UPSTREAM="OpenAI (api.openai.com)"
  sed -e "s#port_value: 10000#port_value: $PORT#" -e "s#port_value: 9901#port_value: $ADMIN_PORT#" \
      -e "s#filename: target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm#filename: $WASM#" \
      "$TEMPLATE" > "$WORK/envoy.yaml"
  MODEL=gpt-4o-mini
else
  cargo build --quiet --release -p tollgate-mock-provider
  MOCK_PORT=$(free_port)
  ./target/release/tollgate-mock-provider --port "$MOCK_PORT" > "$WORK/mock.log" 2>&1 &
  pids+=($!)
  UPSTREAM="the built-in mock provider (127.0.0.1:$MOCK_PORT)"
  sed -e "s#port_value: 10000#port_value: $PORT#" -e "s#port_value: 9901#port_value: $ADMIN_PORT#" \
      -e "s#port_value: 8081#port_value: $MOCK_PORT#" \
      -e "s#filename: target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm#filename: $WASM#" \
      envoy.yaml > "$WORK/envoy.yaml"
  MODEL=mock-model
fi

"$ENVOY" -c "$WORK/envoy.yaml" --concurrency 2 --log-level warn --component-log-level wasm:info \
  --base-id-path "$WORK/base-id" --use-dynamic-base-id &
pids+=($!)
for _ in $(seq 100); do
  if curl -s -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready"; then break; fi
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" || { echo "[run] Envoy did not become ready" >&2; exit 1; }

cat <<MSG

Tollgate is running: Envoy on http://127.0.0.1:$PORT in front of $UPSTREAM.
Policy: envoy.yaml (free tier: 5 requests/minute, 50/day per x-tollgate-user; pro via x-tollgate-tier).
Send OpenAI requests to http://127.0.0.1:$PORT/v1 — for example, run this 6 times:

  curl -si http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
       -H 'x-tollgate-user: alice' -d '{"model":"$MODEL","messages":[{"role":"user","content":"Hi"}]}'

Envoy admin (stats: wasmcustom.tollgate_*): http://127.0.0.1:$ADMIN_PORT/stats?filter=tollgate
Ctrl-C to stop.
MSG
wait "${pids[@]}"
