#!/usr/bin/env bash
# Everything that needs the GPU, in one call: build, kernel checks, parity with Hugging Face,
# compute-sanitizer, benchmark. Run from the repo root on the GPU machine (torch, transformers):
#     bash tests/gpu.sh [kernels | kernels-quick] [prefill] [parity] [sanitizer] [bench | decode | prefill-bench]
# (default: kernels prefill parity sanitizer bench; `decode`: the benchmark's decode table alone,
# every shape, the persistent kernel against the chain; `prefill-bench`: prefill and perplexity mode,
# the TMA products against the simple ones). `ab` times decode of ./run against
# .gpu/run-base, another build (e.g. of main) carried along, or the builds AB_AGAINST=A,B,... names
# (AB_TRACE=A,B,...: builds of tests/decode_trace.py's copy of decode.cu, their traces too; AB_INT8=1:
# the 0.6B shape's int8 weights too; AB_CASES=0.6B/bf16,8B/int8,...: those cases instead). Text and
# tokenizer come from data/ (tinyshakespeare and Qwen3's tokenizer files, xz), decompressed into the
# work folder. Logs go to $OUT (or /tmp/gpu-out); the tables are printed last, then one line per
# step. Under a time limit, `timeout -s INT SECONDS bash tests/gpu.sh ...` still prints them for the
# steps that ran.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
WORK=/tmp/gpu-work
mkdir -p "$OUT" "$WORK/qwen3-tokenizer"
export PYTHONUNBUFFERED=1
steps=${*:-kernels prefill parity sanitizer bench}
names=() statuses=() seconds=() details=()
current="" step_start=$SECONDS

record() {  # name, exit status, seconds, the log line that sums the step up
    names+=("$1"); statuses+=("$([ "$2" = 0 ] && echo ok || echo "FAILED ($2)")"); seconds+=("$3"); details+=("$4")
}

step() {  # name, pattern of its summary line, command...: runs it, logs it, records it
    local name=$1 pattern=$2; shift 2
    echo "== $name"
    current=$name step_start=$SECONDS
    "$@" 2>&1 | tee -i "$OUT/$name.log"  # -i: a time limit's SIGINT leaves the last lines to the log
    local rc=${PIPESTATUS[0]}
    current=""
    [ "$rc" = 0 ] || echo "== $name FAILED ($rc)"
    record "$name" "$rc" $((SECONDS - step_start)) "$(grep -E "$pattern" "$OUT/$name.log" | tail -n 1 | cut -c1-150)"
}

unpack() {  # data/NAME, or data/NAME.xz decompressed, to $WORK/NAME
    if [ -f "data/$1" ]; then cp "data/$1" "$WORK/$1"
    else python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "data/$1.xz" "$WORK/$1"; fi
}

summary() {  # the tables: failing kernel cases, the parity table, the benchmark table, one line per step
    echo
    for f in kernels kernels-quick prefill; do
        [ -f "$OUT/$f.log" ] && grep -E 'FAIL' "$OUT/$f.log" | grep -v '^== ' | sed "s/^/$f: /"
    done
    [ -f "$OUT/parity.log" ] && sed -n '/^model  *| run /,$p' "$OUT/parity.log"
    for f in bench decode prefill-bench; do [ -f "$OUT/$f.log" ] && sed -n '/^$/,$p' "$OUT/$f.log" | tail -n 40; done
    [ -f "$OUT/ab.log" ] && sed -n '/^$/,$p' "$OUT/ab.log" | tail -n 12
    echo
    echo "$gpu, commit $commit, $(date -u +%Y-%m-%d)"
    local status=0
    printf '%-22s | %-12s | %6s | %s\n' step result time summary
    for i in "${!names[@]}"; do
        printf '%-22s | %-12s | %5ss | %s\n' "${names[$i]}" "${statuses[$i]}" "${seconds[$i]}" "${details[$i]}"
        [ "${statuses[$i]}" = ok ] || status=1
    done
    return $status
}

interrupted() {  # the time limit: record the step it stopped, print what ran
    [ -n "$current" ] && record "$current" 130 $((SECONDS - step_start)) "interrupted (time limit)"
    summary
    exit 1
}

gpu=$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt")
# The lent machine gets a copy of the working tree whose git metadata can be older than the tree:
# name the commit the tree is at with COMMIT=... (from your checkout) for the tables to say it.
commit=${COMMIT:-"$(git rev-parse --short HEAD 2>/dev/null || echo "no git") (from git: set COMMIT)"}
start=$SECONDS
if [ -n "${PREBUILT:-}" ]; then  # PREBUILT=1: run, runcpu and build/libkernels.so came built from this tree
    export KERNELS_LIB=$PWD/build/libkernels.so  # the kernel tests take it as it is (no make)
    ls run runcpu build/libkernels.so >"$OUT/build.log" 2>&1
    rc=$?
    record build "$rc" 0 "prebuilt (PREBUILT=1)"
else
    make -s -j"$(nproc)" run runcpu build/libkernels.so >"$OUT/build.log" 2>&1
    rc=$?
    record build "$rc" $((SECONDS - start)) "make -j$(nproc) run runcpu build/libkernels.so"
fi
[ "$rc" = 0 ] || { tail -30 "$OUT/build.log"; exit 1; }
for f in tinyshakespeare.txt qwen3-tokenizer/tokenizer.json qwen3-tokenizer/tokenizer_config.json; do
    unpack "$f" || { echo "error: cannot unpack data/$f into $WORK"; exit 1; }
done
text=$WORK/tinyshakespeare.txt tokenizer=$WORK/qwen3-tokenizer
trap interrupted INT TERM

for s in $steps; do
    case $s in
    kernels) step kernels '^[0-9]+/[0-9]+ passed' python3 tests/gpu_kernels.py ;;
    kernels-quick) step kernels-quick '^[0-9]+/[0-9]+ passed' python3 tests/gpu_kernels.py --quick ;;
    prefill) step prefill 'all checks passed|FAILED' python3 tests/gpu_prefill.py ;;
    parity) step parity '^parity: ' python3 tests/gpu_parity.py "$WORK" "$text" "$tokenizer" ;;
    sanitizer)
        # a 12-token prefill, then decode: the tiny GQA fixture (head_dim 32, the CUDA-core prefill
        # attention) and the demo (head_dim 64, the tensor-core flash attention of prefill; demo8: its
        # int8 export), each with the persistent decode kernel (-a 1) and the chain (-a 0).
        # SANITIZE=... picks some of them.
        python3 export.py tests/fixtures/qwen3_gqa2_bf16 "$WORK/tiny.bin" >/dev/null 2>&1
        python3 export.py demo "$WORK/demo.bin" >/dev/null 2>&1
        python3 export.py demo "$WORK/demo8.bin" --dtype int8 >/dev/null 2>&1
        echo "1 2 3 4 5 6 7 8 9 10 11 12" >"$WORK/ids.txt"
        for run in ${SANITIZE:-tiny-a1 tiny-a0 demo-a1 demo-a0 demo8-a1 demo8-a0}; do
            model=${run%-a*} fused=${run#*-a}
            step "memcheck-$run" 'ERROR SUMMARY' compute-sanitizer --tool memcheck --error-exitcode 9 \
                ./run "$WORK/$model.bin" -m logits -f "$WORK/ids.txt" -n 20 -a "$fused"
            step "racecheck-$run" 'RACECHECK SUMMARY' compute-sanitizer --tool racecheck --error-exitcode 9 \
                ./run "$WORK/$model.bin" -m logits -f "$WORK/ids.txt" -n 4 -a "$fused"
        done ;;
    bench) step bench '^ours / HF: prefill' python3 tests/gpu_bench.py "$WORK" "$text" "$tokenizer" ;;
    decode) step decode 'persistent / chain' python3 tests/gpu_bench.py "$WORK" "$text" "$tokenizer" decode ;;
    prefill-bench) step prefill-bench 'perplexity mode' python3 tests/gpu_bench.py "$WORK" "$text" "$tokenizer" prefill \
                       ${PREFILL_AGAINST:+--against "$PREFILL_AGAINST"} ;;
    ab) step ab '^8B bf16 decode tok/s at context 128, \./run' python3 tests/gpu_bench.py "$WORK" "$text" "$tokenizer" \
            --against "${AB_AGAINST:-.gpu/run-base}" ${AB_TRACE:+--trace "$AB_TRACE"} ${AB_INT8:+--int8} ${AB_CASES:+--cases "$AB_CASES"} ;;
    *) echo "unknown step $s"; record "$s" 2 0 "unknown step" ;;
    esac
done
cp "$WORK"/*.json "$OUT"/ 2>/dev/null

summary
