#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60); CI calls it with a short
# time (`scripts/fuzz.sh 20`). Installs cargo-fuzz if it is missing.
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module) to rustc.
# Only stable Rust is installed here, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them (the
# sanitizer runtimes ship with the stable x86_64-linux std). Each target's corpus lives in
# fuzz/corpus/<target> (git-ignored), seeded with the recorded provider fixtures; a crash
# leaves its input in fuzz/artifacts/<target>/ and makes this script exit non-zero. Inputs are
# capped at 4 KiB (longer seeds are truncated): chunk-boundary bugs need no more, and it keeps
# the rate up (every input is decoded several times in different chunkings).
#
# Reproduce a crash:  RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-…
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

fixtures="${TOLLGATE_FIXTURES:-../shared/fixtures}"
# Seed corpus per target: the recorded bodies that target decodes.
seed() {
    local target="$1" dir="fuzz/corpus/$1"
    mkdir -p "$dir"
    [ -d "$fixtures" ] || return 0
    case "$target" in
        sse_decoder) find "$fixtures" -name '*.sse' -exec cp -n {} "$dir/" \; ;;
        json_array) find "$fixtures" -name 'stream_array_*.json' ! -name '*.*.json' -exec cp -n {} "$dir/" \; ;;
    esac
}

cargo fuzz build
status=0
summary=()
for target in $(cargo fuzz list); do
    seed "$target"
    log="$(mktemp)"
    echo "== fuzz $target for ${seconds}s" >&2
    if cargo fuzz run "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 2>&1 | tee "$log" >&2; then
        result=ok
    else
        result=FAILED
        status=1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    summary+=("$target: $result, ${runs:-?} runs in ${seconds}s")
    rm -f "$log"
done
printf '%s\n' "${summary[@]}"
exit "$status"
