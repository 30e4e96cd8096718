#!/usr/bin/env bash
# Builds the libFuzzer targets and runs each for a bounded number of iterations from a copy of the
# seed corpus (fuzz/corpus is never modified). Exits non-zero on any crash, leak or UB report.
#   fuzz/run.sh [BUILD_DIR]        (default build-fuzz; needs clang)
#   FUZZ_RUNS=N                    iterations per target (default 20000)
#   FUZZ_MAX_LEN=N                 largest input (default 4096)
#   FUZZ_TARGETS="a b"             the targets to run (default: all eight)
#   FUZZ_TIME=S                    stop each target after S seconds at most (default 45)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-build-fuzz}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
RUNS=${FUZZ_RUNS:-20000}
MAX_LEN=${FUZZ_MAX_LEN:-4096}
TIME=${FUZZ_TIME:-45}

# MMB_FUZZ builds the library with -fsanitize=fuzzer-no-link so libFuzzer sees its coverage.
CC=${CC:-clang} cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMMB_FUZZ=ON -DMMB_SANITIZE=ON \
    -DMMB_BUILD_BENCH=OFF -DMMB_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j"$(nproc 2>/dev/null || echo 2)" --target fuzz_safetensors fuzz_config fuzz_chat fuzz_tokenizer fuzz_image \
    fuzz_preprocessor fuzz_serve fuzz_gguf fuzz_tar >/dev/null

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmb-fuzz.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

status=0
for t in ${FUZZ_TARGETS:-safetensors config chat tokenizer image preprocessor serve gguf tar}; do
    mkdir -p "$WORK/$t" "$WORK/$t-artifacts"
    cp "$ROOT/fuzz/corpus/$t/"* "$WORK/$t/"
    echo "== fuzz_$t: $RUNS runs or $TIME s, max_len $MAX_LEN"
    if ! "$BUILD/fuzz_$t" -runs="$RUNS" -max_len="$MAX_LEN" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
            -max_total_time="$TIME" \
            -artifact_prefix="$WORK/$t-artifacts/" "$WORK/$t" >"$WORK/$t.log" 2>&1; then
        tail -n 60 "$WORK/$t.log"
        mkdir -p "$BUILD/fuzz-crashes"
        cp "$WORK/$t-artifacts/"* "$BUILD/fuzz-crashes/" 2>/dev/null || true
        echo "fuzz_$t FAILED (reproducers copied to $BUILD/fuzz-crashes/)" >&2
        status=1
    else
        grep -E "^Done" "$WORK/$t.log" | tail -n 1 || true
    fi
done
exit $status
