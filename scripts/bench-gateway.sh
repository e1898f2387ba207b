#!/usr/bin/env bash
# Bare Envoy vs Envoy + Tollgate, side by side in one run on one pinned core
# (host-tests/tests/gateway_bench.rs): CPU per request for gpt / gpt-s / claude / claude-s,
# the filter's own share, requests per second kept, Envoy's memory with one worker VM; and a second
# floor, Envoy with a Wasm filter that only reads the bodies (bench/floor-filter).
# Then the worker in workerd (wrangler dev) vs the mock called directly: P50/P99 added, workerd's
# CPU per request (when the worker toolchain is installed: scripts/setup.sh all).
# Prints markdown for BENCHMARKS.md.
#
#   scripts/bench-gateway.sh              # 4000 requests × 2 rounds per case and Envoy
#   scripts/bench-gateway.sh 10000 3      # more
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh envoy >&2
bash scripts/build-wasm.sh >&2
cargo build --quiet -p tollgate-floor-filter --target wasm32-unknown-unknown --profile wasm
cargo build --quiet --release -p tollgate-mock-provider
GATEWAY_BENCH_REQUESTS="${1:-4000}" GATEWAY_BENCH_ROUNDS="${2:-2}" \
  cargo test --quiet --release -p tollgate-host-tests --test gateway_bench -- --ignored --nocapture measure
if [ -x node_modules/.bin/wrangler ]; then
  bash scripts/build-worker.sh >&2
  cargo test --quiet --release -p tollgate-host-tests --test gateway_bench -- --ignored --nocapture worker
else
  echo "(the worker part needs scripts/setup.sh all: skipped)" >&2
fi
