#!/usr/bin/env bash
# Builds the release filter.wasm (profile `wasm`: opt-level s, LTO, one codegen unit, panic=abort,
# stripped) at target/wasm32-unknown-unknown/wasm/tollgate_filter.wasm, then runs binaryen's
# `wasm-opt -Os` over it when the npm tools are installed (scripts/setup.sh all): 14 % smaller and
# ~10 % faster in V8 and wasmtime (BENCHMARKS.md "The gateway benchmark"). The optimised file
# replaces cargo's output in place (same inode, so cargo's copy in deps/ is the optimised one too);
# a stamp with its hash skips the 25 s pass when nothing was rebuilt.
#
#   scripts/build-wasm.sh            # filter.wasm
#   scripts/build-wasm.sh --names    # also keep the function names (profile wasm-names), for profiling
set -euo pipefail
cd "$(dirname "$0")/.."
profile=wasm
keep=()
if [ "${1:-}" = --names ]; then
  profile=wasm-names
  keep=(--debuginfo)
fi
cargo build --quiet -p tollgate-filter --target wasm32-unknown-unknown --profile "$profile"
wasm=target/wasm32-unknown-unknown/$profile/tollgate_filter.wasm
stamp=$wasm.wasm-opt
opt=node_modules/.bin/wasm-opt
hash() { sha256sum "$1" | cut -d' ' -f1; }
if [ -x "$opt" ]; then
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$(hash "$wasm")" ]; then
    # The features rustc enables for wasm32-unknown-unknown (the stripped file has no
    # target_features section to read them from); Envoy's V8 and wasmtime run them all.
    "$opt" -Os "${keep[@]}" --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
      --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
      "$wasm" -o "$wasm.opt"
    cat "$wasm.opt" > "$wasm"
    rm -f "$wasm.opt"
    hash "$wasm" > "$stamp"
  fi
else
  echo "[build] $opt is missing (scripts/setup.sh all installs it): filter.wasm is not run through wasm-opt" >&2
fi
ls -l "$wasm" | awk '{print "[build] filter.wasm: " $5 " bytes"}' >&2
