#!/usr/bin/env bash
# Where filter.wasm spends its time, per function, for one gateway-benchmark case (gpt, gpt-s,
# claude, claude-s): the filter built with its function names (scripts/build-wasm.sh --names: the
# same code as filter.wasm), run in a loop by host-tests/tests/filter_profile.rs, sampled by perf.
#
#   scripts/profile-filter.sh gpt            # in the wasmtime host (Cranelift)
#   scripts/profile-filter.sh gpt-s v8       # in Node's V8 with --no-liftoff (bench/v8-host), as in Envoy
#
# Prints the time per request, then the guest functions by inclusive share of all samples.
# Needs perf (linux-perf); v8 needs the npm tools (scripts/setup.sh all).
set -euo pipefail
cd "$(dirname "$0")/.."
case=${1:-gpt}
engine=${2:-wasmtime}
secs=${PROFILE_SECS:-6}
bash scripts/build-wasm.sh --names >&2
wasm=$PWD/target/wasm32-unknown-unknown/wasm-names/tollgate_filter.wasm
cargo build --quiet --release -p tollgate-host-tests --tests
bin=$(cargo test --release -p tollgate-host-tests --test filter_profile --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "filter_profile" in m["executable"]][-1])')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ "$engine" = v8 ]; then
  FILTER_PROFILE_CASE=$case FILTER_PROFILE_DIR=$out/case FILTER_PROFILE_WASM=$wasm "$bin" --ignored --quiet write_v8_case >/dev/null
  # In the scratch directory: node leaves its isolate-*-v8.log there, not in the checkout.
  root=$PWD
  (cd "$out" && perf record -q -F 2999 -g -o "$out/perf.data" "$root/node_modules/.bin/node" --no-liftoff --perf-basic-prof \
    "$root/bench/v8-host/run.mjs" "$out/case" "$secs")
else
  TOLLGATE_WASM_PERFMAP=1 FILTER_PROFILE_CASE=$case FILTER_PROFILE_SECS=$secs FILTER_PROFILE_WASM=$wasm \
    perf record -q -F 2999 -g -o "$out/perf.data" "$bin" --ignored --nocapture profile 2>&1 | grep 'µs'
fi
perf report -i "$out/perf.data" --no-children --sort dso -g none --stdio 2>/dev/null | grep -v '^#' | grep -v '^$' | head -5
echo "--- inclusive share of all samples, guest functions (rustc-demangled where perf could not)"
perf report -i "$out/perf.data" --children --sort symbol -g none --stdio 2>/dev/null \
  | grep -E '(JS:)?_(ZN|R)' | head -"${PROFILE_TOP:-40}" \
  | awk '{s=substr($0, index($0,"[.]")+4); sub(/^JS:/,"",s); sub(/-[0-9]+-turbofan.*/,"",s); sub(/ +$/,"",s); printf "%7s  %s\n", $1, substr(s,1,160)}'
