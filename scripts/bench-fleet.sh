#!/usr/bin/env bash
# What `store.redis` costs (host-tests/tests/fleet_bench.rs): latency per admitted request next to
# Envoy's shared data with one Envoy and with three; a fleet's throughput on one hot tier key and
# its compare-and-set conflict rate; the store service's CPU per job; Redis memory per identity.
# Starts its own Redis, store replicas, Envoys and mock provider on 127.0.0.1; prints markdown.
#
#   scripts/bench-fleet.sh            # 2000 requests per row
#   scripts/bench-fleet.sh 8000       # more
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh redis >&2
bash scripts/build-wasm.sh >&2
cargo build --quiet --release -p tollgate-mock-provider -p tollgate-cli
FLEET_BENCH_REQUESTS="${1:-2000}" cargo test --quiet --release -p tollgate-host-tests --test fleet_bench -- --ignored --nocapture measure
