#!/usr/bin/env bash
# Runs every test: core unit tests and proptests, the wasmtime Proxy-Wasm host tests against the
# release filter.wasm, the real-Envoy end-to-end tests and the real-workerd end-to-end tests.
# Installs what is missing first (scripts/setup.sh; quick when everything is there).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

step "toolchain"
bash scripts/setup.sh all
step "build: filter.wasm"
bash scripts/build-wasm.sh
step "build: edge worker"
bash scripts/build-worker.sh
step "build: mock provider and the tollgate binary (the fleet store service)"
cargo build --quiet --release -p tollgate-mock-provider -p tollgate-cli
step "tests"
# One release build serves the native tests of core, host-tests and the mock (wasmtime is far
# too slow unoptimised); the worker crate's native unit tests build separately, so that its
# dependencies' features never change the wasmtime build.
cargo test --release
cargo test -p tollgate-edge-worker -p tollgate-filter
step "fuzz (short run; scripts/fuzz.sh 600 TARGET for a long one)"
bash scripts/fuzz.sh "${TOLLGATE_FUZZ_SECONDS:-15}"
