"""Profiling aid for the persistent decode kernel (not part of the build): writes to stdout a copy of
decode.cu that times the parts of every layer with clock64 on thread 0 of each block, and prints the
averages over the blocks and layers of decode steps 41..120 from the last block of step 120:

    python3 tests/decode_trace.py decode.cu > /tmp/decode_traced.cu        # STREAMS=1: also the
    nvcc ... -DDECODE_PART=0 -I. -c /tmp/decode_traced.cu -o decode-0.o   # stream's per-piece parts
    (link as the Makefile links run), then ./run model.bin -n 160 ... prints lines "trace ...".

Marks are placed by matching decode.cu's text; a mark whose text moved fails an assertion."""
import sys
header = r'''
#define NT 20
__device__ unsigned long long trace_sum[NT], trace_cnt[NT], trace_ns, trace_cycles;
__shared__ long long tr_acc[NT], tr_last; __shared__ int tr_cnt[NT];
#define TMARK(k) do { if (threadIdx.x == 0) { long long t_ = clock64(); tr_acc[k] += t_ - tr_last; tr_cnt[k]++; tr_last = t_; } } while (0)
__device__ __forceinline__ unsigned long long gtimer() { unsigned long long t; asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); return t; }
'''
marks = [
  ("if (l > 0) inv_rms = load_published_normed(v, pub.x, p.rms_att + (size_t)l * D, D, flag_of(p, l - 1, PUB_X_OUT), p.eps);", 0, "after"),
  ("        attention_phase<KV, HD, G, WARPS>(p, pub, l, pos, att_sh, inv_freq);", 3, "after"),
  ("        load_published(v, pub.att, q_dim, flag_of(p, l, PUB_ATT));", 4, "after"),
  ("        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_O, v, add_to_x(l, PUB_X_MID));", 5, "after"),
  ("        inv_rms = load_published_normed(v, pub.x, p.rms_ffn + (size_t)l * D, D, flag_of(p, l, PUB_X_MID), p.eps);", 6, "after"),
  ("        load_published(v, pub.h, p.hidden_dim, flag_of(p, l, PUB_H));", 9, "after"),
  ("        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_DOWN, v, add_to_x(l, PUB_X_OUT));", 10, "after"),
  ("        __syncthreads();  // the queries and the block's own cache row are written", 12, "after"),
  ("        // the chunk holding row pos: k_norm and RoPE of the new key; k / k_scale and v stored there", 11, "before"),
]
text = open(sys.argv[1]).read()
text = text.replace('#include "attention.cuh"\n', '#include "attention.cuh"\n' + header, 1)
for pat, k, where in marks:
    assert pat in text, pat
    if where == "after": text = text.replace(pat, pat + f"\n        TMARK({k});", 1)
    else: text = text.replace(pat, f"        TMARK({k});\n" + pat, 1)
# qkv stream end, gate_up end (the RMSNorms are in the waits for x: marks 0 and 6)
text = text.replace("            publish(pub.qkv + row, dot * inv_rms + (bias ? bias[row] : 0.f), flag_of(p, l, PUB_QKV));\n        });", "            publish(pub.qkv + row, dot * inv_rms + (bias ? bias[row] : 0.f), flag_of(p, l, PUB_QKV));\n        }); TMARK(2);", 1)
text = text.replace("            publish(pub.h + i, gate / (1.f + expf(-gate)) * (up * inv_rms), flag_of(p, l, PUB_H));\n        });", "            publish(pub.h + i, gate / (1.f + expf(-gate)) * (up * inv_rms), flag_of(p, l, PUB_H));\n        }); TMARK(8);", 1)
# attend_chunk end and merge end
text = text.replace("k_cache, v_cache, kv_head, heads, chunk, len, n_chunks, p.n_kv_heads);", "k_cache, v_cache, kv_head, heads, chunk, len, n_chunks, p.n_kv_heads); TMARK(13);", 1)
text = text.replace("heads.h0, heads.count, len, n_chunks, HD);\n    }", "heads.h0, heads.count, len, n_chunks, HD);\n        if (chunk == 0) TMARK(14);\n    }", 1)
# init at layer loop start, and per-layer start mark: reset tr_last at kernel start
text = text.replace("    for (int l = 0; l < L; l++) {\n        // 1. qkv", "    if (threadIdx.x == 0) { for (int k = 0; k < NT; k++) { tr_acc[k] = 0; tr_cnt[k] = 0; } tr_last = clock64(); }\n    const long long step_c0 = clock64(); const unsigned long long step_t0 = gtimer();\n    for (int l = 0; l < L; l++) {\n        // 1. qkv", 1)
# flush before the final arrive
flush = r'''    if (threadIdx.x == 0) {
        if (p.epoch > 40 && p.epoch <= 120) {
            for (int k = 0; k < NT; k++) { atomicAdd(&trace_sum[k], (unsigned long long)tr_acc[k]); atomicAdd(&trace_cnt[k], (unsigned long long)tr_cnt[k]); }
            if (blockIdx.x == 0) { atomicAdd(&trace_ns, gtimer() - step_t0); atomicAdd(&trace_cycles, (unsigned long long)(clock64() - step_c0)); }
        }
    }
    if (arrive_last(p.blocks_done, gridDim.x)) {  // the last block: every other one is done
        if (threadIdx.x == 0 && p.epoch == 120) {
            const double ghz = (double)trace_cycles / trace_ns;
            printf("trace: %.3f GHz, layers+head %.1f us per step, blocks %d\n", ghz, trace_ns / 80.0 / 1000, gridDim.x);
            const char* names[NT] = {"x arrives + rmsnorm", "-", "qkv stream", "attention rest", "att arrives", "o stream", "x_mid arrives + norm", "-", "gate_up stream", "h arrives", "down stream", "item: q ready", "item: k/v stored", "item: attend_chunk", "item: merge", "stream: advance+issue", "stream: stage wait", "stream: dot+epilogue", "-", "-"};
            for (int k = 0; k < NT; k++) if (trace_cnt[k]) printf("trace %2d %-20s %8.2f us per hit, %6.1f hits per step\n", k, names[k], trace_sum[k] / (double)trace_cnt[k] / ghz / 1000, trace_cnt[k] / 80.0);
        }
        if (threadIdx.x == 0 && p.epoch == 40) { for (int k = 0; k < NT; k++) trace_sum[k] = trace_cnt[k] = 0; trace_ns = trace_cycles = 0; }'''
old = "    if (arrive_last(p.blocks_done, gridDim.x)) {  // the last block: every other one is done"
assert old in text
text = text.replace(old, flush, 1)
import os
if os.environ.get("STREAMS"):
    a = "        mbar_wait(&s.full[slot], (s.consumed / STAGES) & 1);"
    assert a in text
    text = text.replace(a, "        TMARK(15);\n" + a + " TMARK(16);", 1)
    b = "        __syncwarp();  // every lane is done with the stage"
    assert b in text
    text = text.replace(b, "        TMARK(17);\n" + b, 1)
assert text.count("TMARK(") == 1 + 13 + (3 if os.environ.get("STREAMS") else 0), "a mark did not find its place"
print(text)
