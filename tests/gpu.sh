#!/usr/bin/env bash
# Everything that needs the GPU, in one call: build, kernel checks, parity with Hugging Face,
# compute-sanitizer, benchmark. Run from the repo root on the GPU machine with .gpu/ holding
# tokenizer.json, tokenizer_config.json and tinyshakespeare.txt (copied from ../shared):
#     bash tests/gpu.sh [kernels] [prefill] [parity] [sanitizer] [bench]     (default: all)
# `ab` times decode of ./run against .gpu/run-base, another build (e.g. of main) carried along.
# Logs go to $OUT (or /tmp/gpu-out); the tables are printed last.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
WORK=/tmp/gpu-work
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
steps=${*:-kernels prefill parity sanitizer bench}
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
make -s -j4 run runcpu build/libkernels.so >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }

step() {  # name, command...: runs it, logs it, keeps its exit status
    local name=$1; shift
    echo "== $name"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name FAILED ($rc)"; status=1; }
}

for s in $steps; do
    case $s in
    kernels) step kernels python3 tests/gpu_kernels.py ;;
    kernels-quick) step kernels python3 tests/gpu_kernels.py --quick ;;
    prefill) step prefill python3 tests/gpu_prefill.py ;;
    parity) step parity python3 tests/gpu_parity.py "$WORK" .gpu/tinyshakespeare.txt .gpu ;;
    sanitizer)
        python3 export.py tests/fixtures/qwen3_gqa2_bf16 "$WORK/tiny.bin" 2>/dev/null
        echo "1 2 3 4 5 6 7 8 9 10 11 12" >"$WORK/ids.txt"
        for fused in 1 0; do
            step "memcheck-a$fused" compute-sanitizer --tool memcheck --error-exitcode 9 \
                ./run "$WORK/tiny.bin" -m logits -f "$WORK/ids.txt" -n 20 -a $fused
            step "racecheck-a$fused" compute-sanitizer --tool racecheck --error-exitcode 9 \
                ./run "$WORK/tiny.bin" -m logits -f "$WORK/ids.txt" -n 4 -a $fused
        done ;;
    bench) step bench python3 tests/gpu_bench.py "$WORK" .gpu/tinyshakespeare.txt .gpu ;;
    ab) step bench python3 tests/gpu_bench.py "$WORK" .gpu/tinyshakespeare.txt .gpu --against .gpu/run-base ;;
    esac
done
cp "$WORK"/*.json "$OUT"/ 2>/dev/null
echo
[ -f "$OUT/kernels.log" ] && tail -n 1 "$OUT/kernels.log"
[ -f "$OUT/prefill.log" ] && tail -n 30 "$OUT/prefill.log"
for f in parity bench; do [ -f "$OUT/$f.log" ] && sed -n '/^$/,$p' "$OUT/$f.log" | tail -45; done
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT"/*check*.log 2>/dev/null
exit $status
