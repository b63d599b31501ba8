"""Profiling aid for the persistent decode kernel (not part of the build): timing by elimination. Writes
to stdout a copy of decode.cu with one or more parts of a step taken out, so that the step's time
without them bounds what they cost:

    python3 tests/decode_eliminate.py decode.cu waits > /tmp/decode_nowaits.cu
    nvcc ... -DDECODE_PART=0 -I. -c /tmp/decode_nowaits.cu -o decode-0.o   (link as the Makefile does)

Parts (comma-separated):
  waits    a published value is taken as it is, without waiting for its flag: no block waits for
           another, so the step is the slowest block's weight stream and dot products alone
  weights  no weight copies (each stage's barrier completes at once, the stages hold zeros): the
           step is its critical path of waits and dot products without the memory's traffic
  dots     no dot products (their sums are 0): the weight stream and the waits without the math
  l2       every weight copy reads the same 2 MB (the start of the embedding table, at the source's
           offset modulo 2 MB): the same copies and dot products, served from L2 instead of DRAM,
           so the step without the memory's own time and queues
The output is meaningless (the logits are kept finite so that greedy decoding goes on: a NaN would
stop the steps); only the speed is. Parts are found by decode.cu's text; a part whose text moved
fails an assertion."""
import sys

text, parts = open(sys.argv[1]).read(), sys.argv[2].split(",")


def replace(old, new):
    global text
    assert text.count(old) == 1, old
    text = text.replace(old, new)


# issue_next's bulk copy of a lane's run of weights
WEIGHT_COPY = ("    if (run_bytes)\n"
               "        bulk_copy(s.stages + (size_t)slot * s.stage_bytes + offset, src, run_bytes, smem_addr(&s.full[slot]), s.policy);\n")
for part in parts:
    if part == "waits":
        replace("    while ((uint32_t)(word >> 32) != flag) word = load_word(slot);\n", "")
    elif part == "weights":
        replace("    if (lane == 0) mbar_arrive_expect_tx(&s.full[slot], total);\n", "    if (lane == 0) mbar_arrive_expect_tx(&s.full[slot], 0);\n")
        replace(WEIGHT_COPY, "    (void)src; (void)run_bytes; (void)offset;\n")
        replace("    s.stage_bytes = stage_bytes;\n",
                "    s.stage_bytes = stage_bytes;\n"
                "    for (int i = threadIdx.x % 32; i < STAGES * stage_bytes / 16; i += 32) reinterpret_cast<float4*>(s.stages)[i] = {};\n")
    elif part == "dots":
        replace("        warp_dot_rows<W, GROUP_ROWS, VIA_PLAIN>(sums, rows, v + piece.col, piece.len, true, piece.n * ROWS, scales);\n",
                "        (void)rows; (void)scales;\n        for (int r = 0; r < GROUP_ROWS; r++) sums[r] = 0.f;\n")
    elif part == "l2":
        replace(WEIGHT_COPY, WEIGHT_COPY.replace(", src, ", ", (const char*)p.embedding + (uintptr_t)src % (2u << 20), "))
    else:
        sys.exit(f"unknown part {part}: waits, weights, dots or l2")
# whatever the inputs, the logits finite and the argmax a token (a NaN would end the steps)
replace("        dot *= inv_rms;\n        p.logits[row] = dot;", "        dot *= inv_rms;\n        if (!isfinite(dot)) dot = 0.f;\n        p.logits[row] = dot;")
print(text)
