#!/usr/bin/env bash
# What admission and settlement cost with six active limits on four store keys
# (gate::admit_chat + gate::finish on a MemoryStore), natively and under wasmtime 48, next to a
# bare serde_json parse of the same body; or, with --keyspace, how much shared data many
# anonymous identities take. Prints a markdown table (stdout) and details (stderr). See
# bench/src/limits.rs for the policy and what each row times.
#
#   scripts/bench-limits.sh                        # 5 rounds of ~80 ms per cell, + callgrind counts
#   scripts/bench-limits.sh --reps 9 --ms 200      # longer, steadier
#   scripts/bench-limits.sh --no-callgrind         # skip the instruction counts (valgrind)
#   scripts/bench-limits.sh --keyspace 1000000,2000000,5000000   # shared data for N identities
#                                                  # (native only; add --step-ms MS, default 1)
# Other arguments go to the runner (bench/src/bin/bench-limits.rs): --only TEXT, --no-wasm.
#
# The guest is built like filter.wasm (profile `wasm`: opt-level z, LTO, panic=abort). Timing
# uses the thread's CPU time; keep the machine as quiet as you can anyway, and trust the
# callgrind column when the ns columns disagree between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

callgrind=yes
keyspace=no
args=()
while (($#)); do
  case "$1" in
    --no-callgrind) callgrind=no; shift ;;
    --callgrind) shift ;;
    --keyspace) keyspace=yes; args+=("$1" "${2:?--keyspace needs a list of counts}"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }

commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain -- core bench | grep -q . && echo " (core/bench with uncommitted changes)" || true)

log "building the native runner (release)"
cargo build --quiet --release -p tollgate-bench --bin bench-limits

if [ "$keyspace" = yes ]; then
  log "commit $commit$dirty; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
  exec target/release/bench-limits "${args[@]}"
fi

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  log "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi
log "building the wasm32 guest (profile wasm)"
cargo build --quiet -p tollgate-bench --lib --target wasm32-unknown-unknown --profile wasm

if [ "$callgrind" = yes ]; then
  if command -v valgrind >/dev/null; then
    args+=(--callgrind)
  else
    log "valgrind not found: no instruction counts (apt-get install valgrind)"
  fi
fi

log "commit $commit$dirty; $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg)"
target/release/bench-limits ${args[@]+"${args[@]}"}
