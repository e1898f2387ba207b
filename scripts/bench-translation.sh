#!/usr/bin/env bash
# What translation costs: the OpenAI front door's request → Anthropic / Gemini / OpenAI-compatible,
# their non-stream responses back, and their streams per SSE event — natively and under wasmtime
# 48, each next to a bare serde_json parse + serialize of the same bytes. Prints a markdown table
# (stdout) and every run's numbers (stderr). See bench/src/lib.rs for what each row times.
#
#   scripts/bench-translation.sh                   # 5 rounds of ~80 ms per cell, + callgrind counts
#   scripts/bench-translation.sh --reps 9 --ms 200 # longer, steadier
#   scripts/bench-translation.sh --no-callgrind    # skip the instruction counts (valgrind)
#   scripts/bench-translation.sh --wasm-opt-level 3 ...  # guest built at another opt-level
#                                                  # (separate target dir; filter.wasm untouched)
# Other arguments go to the runner (bench/src/bin/bench-translation.rs): --only TEXT, --no-wasm.
#
# The guest is built like filter.wasm (profile `wasm`: opt-level z, LTO, panic=abort) unless
# --wasm-opt-level says otherwise. Timing uses the thread's CPU time; keep the machine as quiet as
# you can anyway, and trust the callgrind columns when the ns columns disagree between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

opt_level=""
callgrind=yes
args=()
while (($#)); do
  case "$1" in
    --wasm-opt-level) opt_level=${2:?--wasm-opt-level needs a value}; shift 2 ;;
    --no-callgrind) callgrind=no; shift ;;
    --callgrind) shift ;;
    *) args+=("$1"); shift ;;
  esac
done

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  log "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

log "building the native runner (release) and the wasm32 guest"
cargo build --quiet --release -p tollgate-bench --bin bench-translation
if [ -n "$opt_level" ]; then
  guest_dir=target/bench-wasm-opt-$opt_level
  CARGO_PROFILE_WASM_OPT_LEVEL=$opt_level \
    cargo build --quiet -p tollgate-bench --lib --target wasm32-unknown-unknown --profile wasm --target-dir "$guest_dir"
  args+=(--wasm "$guest_dir/wasm32-unknown-unknown/wasm/tollgate_bench.wasm")
else
  cargo build --quiet -p tollgate-bench --lib --target wasm32-unknown-unknown --profile wasm
fi

if [ "$callgrind" = yes ]; then
  if command -v valgrind >/dev/null; then
    args+=(--callgrind)
  else
    log "valgrind not found: no instruction counts (apt-get install valgrind)"
  fi
fi

commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain -- core bench | grep -q . && echo " (core/bench with uncommitted changes)" || true)
log "commit $commit$dirty; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/bench-translation ${args[@]+"${args[@]}"}
