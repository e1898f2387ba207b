#!/usr/bin/env bash
# Builds the Cloudflare Worker (edge-worker/) offline with worker-build 0.8.7.
#
# Output: edge-worker/build/index.js (+ index_bg.wasm; build/worker/shim.mjs re-exports it),
# which wrangler.toml's `main` points at. Cargo's output goes to the shared target dir
# ($CARGO_TARGET_DIR, default <repo>/target), profile `worker` (the size profile, minus the full strip wasm-bindgen cannot take).
#
# Prerequisites (once):
#   npm install                                     # esbuild, binaryen (wasm-opt), wrangler, node 22
#   rustup target add wasm32-unknown-unknown
#   cargo install worker-build@0.8.7 --locked
#   cargo install wasm-bindgen-cli@<wasm-bindgen version in Cargo.lock>    # no --locked
# worker-build downloads wasm-bindgen, esbuild and wasm-opt unless told where they are; the
# variables below point it at the local ones, and this script refuses to run without them
# rather than letting it try the network.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
export WASM_BINDGEN_BIN="${WASM_BINDGEN_BIN:-$HOME/.cargo/bin/wasm-bindgen}"
export ESBUILD_BIN="${ESBUILD_BIN:-$repo/node_modules/@esbuild/linux-x64/bin/esbuild}"
export WASM_OPT_BIN="${WASM_OPT_BIN:-$repo/node_modules/.bin/wasm-opt}"
WORKER_BUILD="${WORKER_BUILD:-$(command -v worker-build || echo "$HOME/.cargo/bin/worker-build")}"

die() { echo "build-worker: $*" >&2; exit 1; }

# `wrangler dev` runs this script on start (wrangler.toml [build]); tests that already built
# the worker set TOLLGATE_WORKER_PREBUILT=1 so it only checks the output is there.
if [ "${TOLLGATE_WORKER_PREBUILT:-}" = 1 ]; then
    [ -f "$repo/edge-worker/build/index.js" ] && [ -f "$repo/edge-worker/build/index_bg.wasm" ] ||
        die "TOLLGATE_WORKER_PREBUILT=1 but edge-worker/build/ is missing: run scripts/build-worker.sh"
    exit 0
fi

[ -x "$WORKER_BUILD" ] || die "worker-build not found: cargo install worker-build@0.8.7 --locked"
wb_version="$("$WORKER_BUILD" --version)"
[ "$wb_version" = "0.8.7" ] || die "worker-build is $wb_version, expected 0.8.7"

lock_bindgen="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' "$repo/Cargo.lock")"
[ -x "$WASM_BINDGEN_BIN" ] || die "$WASM_BINDGEN_BIN missing: cargo install wasm-bindgen-cli@$lock_bindgen"
cli_bindgen="$("$WASM_BINDGEN_BIN" --version | awk '{print $2}')"
[ "$cli_bindgen" = "$lock_bindgen" ] ||
    die "wasm-bindgen CLI is $cli_bindgen but Cargo.lock has $lock_bindgen: cargo install wasm-bindgen-cli@$lock_bindgen"
[ -x "$ESBUILD_BIN" ] || die "$ESBUILD_BIN missing: run npm install in $repo"
[ -x "$WASM_OPT_BIN" ] || die "$WASM_OPT_BIN missing: run npm install in $repo"

# worker-build finds the crate from the working directory and writes to <crate>/build.
cd "$repo/edge-worker"
"$WORKER_BUILD" --profile worker "$@"

ls -l "$repo/edge-worker/build/index.js" "$repo/edge-worker/build/index_bg.wasm"
