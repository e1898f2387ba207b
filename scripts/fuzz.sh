#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (or only the TARGETs named) for SECONDS each (default
# 60): `scripts/fuzz.sh [SECONDS [TARGET...]]`. CI calls it with a short time
# (`scripts/fuzz.sh 20`). Installs cargo-fuzz if it is missing.
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
shift $(( $# > 0 ? 1 : 0 ))
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
        translate_anthropic) seed_translate "$dir" anthropic ;;
        translate_gemini) seed_translate "$dir" gemini ;;
        translate_openai) seed_translate "$dir" openai openai-compatible ;;
        policy) cp -n policies/templates/*.json examples/policies/*.json "$dir/" 2>/dev/null || true ;;
        gate) find "$fixtures" -name 'request_*.json' -exec sh -c 'for f; do { printf "alice|free|ar-SA,ar;q=0.9"; cat "$f"; } > "$0/seed-$(basename "$f")"; done' "$dir" {} + ;;
    esac
}

# translate_* inputs are a header, then a recorded answer (layout in
# fuzz/fuzz_targets/translate_common.rs): a mode byte (bit 0 stream request, bit 1 stream
# answer, bit 2 include_usage, bit 3 request variant, bit 4 Gemini's JSON-array stream), then for
# a stream a chunking seed byte, for a complete answer three status digits and a retry-after
# length byte (0: none; 1 + n: n bytes follow). Seeds are named after their fixture and mode and
# rewritten on every run, so seeding is idempotent.
seed_translate() {
    local dir="$1" sub f base status mode
    shift
    for sub in "$@"; do
        [ -d "$fixtures/$sub" ] || continue
        for f in "$fixtures/$sub"/*; do
            base="$(basename "$f")"
            case "$base" in
                *.sse)
                    for mode in 03 07 0f; do seed_file "$dir/seed-$base-m$mode" "\\x$mode\\x05" < "$f"; done ;;
                *.chunks.txt)  # one data payload a line
                    for mode in 03 07; do
                        { awk 'NF { print "data: " $0; print "" }' "$f"; [ "$sub" = anthropic ] || printf 'data: [DONE]\n\n'; } |
                            seed_file "$dir/seed-$base-m$mode" "\\x$mode\\x05"
                    done ;;
                *.request.json | *.headers.json | request_*.json) ;;
                stream_array_*.json)
                    for mode in 13 17 1f; do seed_file "$dir/seed-$base-m$mode" "\\x$mode\\x05" < "$f"; done ;;
                *.json)
                    if [[ "$base" =~ ^error_([0-9]{3})_ ]]; then
                        status="${BASH_REMATCH[1]}"
                        seed_file "$dir/seed-$base-m00" "\\x00${status}\\x00" < "$f"
                        seed_file "$dir/seed-$base-m01-retry" "\\x01${status}\\x0320" < "$f"
                    else
                        for mode in 00 08; do seed_file "$dir/seed-$base-m$mode" "\\x${mode}200\\x00" < "$f"; done
                    fi ;;
            esac
        done
    done
}

# Writes the printf escapes in $2, then stdin, to $1.
seed_file() {
    { printf "$2"; cat; } > "$1"
}

cargo fuzz build
status=0
summary=()
for target in $( (($# > 0)) && printf '%s\n' "$@" || cargo fuzz list); do
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
