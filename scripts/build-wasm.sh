#!/usr/bin/env bash
# Builds the release filter.wasm (profile `wasm`: opt-level s, LTO, one codegen unit, panic=abort,
# stripped) at target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p tollgate-filter --target wasm32-unknown-unknown --profile wasm
ls -l target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm | awk '{print "[build] filter.wasm: " $5 " bytes"}' >&2
