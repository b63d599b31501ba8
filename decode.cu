// decode.cu: one decode step (a token through every layer, then the LM head and its argmax) as a
// single persistent kernel: the fast path (run.c -a 1, the default). The chain of one kernel per
// operation (-a 0) computes the same function and is the reference it is tested against.
//
// Decoding one token reads every weight once, so a step is bound by memory: the floor is the
// weight bytes over the bandwidth. A chain of ~250 small kernels leaves the memory idle at every
// kernel boundary (launch, ramp-up, drain). Here one block per SM runs the whole step:
//
// Weights: each block owns a fixed share of the rows of every matrix (block_span), split again over
//   its warps (warp_span). Every warp streams its shares, in the order the step uses them (per layer
//   wqkv, wo, w_gate_up, w_down; then the LM head), through its own few shared-memory stages: its
//   lanes issue the bulk copies (cp.async.bulk, one run of memory a lane, completing on the stage's
//   mbarrier) of the next piece as soon as the warp is done with a stage. No warp waits for another
//   to stream, and weights do not depend on the activations, so the copies run ahead of the math
//   across the phase boundaries while the block waits for the others: the memory does not idle.
// Activations: a value that other blocks read (qkv, the attention partials and output, x, h) is
//   published: stored with the flag of its (step, layer, phase) in one 8-byte word, which the
//   readers poll until it carries the flag they wait for (below). A phase that needs a whole vector
//   starts as soon as the last of its values lands: no counters, fences or barriers between blocks.
//
// The phases, one comment each in decode_step_kernel:
//   0. x = embedding[token]
//   per layer:
//   1. qkv = wqkv . rmsnorm(x) + bqkv          every block its rows; each block computes rms(x) itself,
//                                              as it loads x, and scales its dot products by 1/rms
//   2. attention                               (chunk, KV head) items over the blocks (attention.cuh); an
//                                              item normalises and rotates its queries itself, the item
//                                              holding row pos stores K and V there, and chunk 0's item
//                                              of a KV head merges its heads' partials into att
//   3. x += wo . att                           a block owns the same rows of x in wo and w_down, and
//   4. h = silu(gate . rmsnorm(x)) * (up . rmsnorm(x))          keeps them in shared memory
//   5. x += w_down . h
//   6. logits = lm_head . rmsnorm(x) and their argmax; the last block to finish reduces the blocks'
//      maxima and leaves (argmax, pos + 1) as the next step's input.
#include <algorithm>
#include "attention.cuh"

// A block: 12 warps of 2 stages each where the registers allow it (G <= 2: 168 a thread, no spills;
// int8 weights also at G = 4, spilling ~30 bytes), else 8 warps of 3 (255 a thread; at 12 warps G = 8
// spills about 1 KB). The dot products of a stage are bound by the latency of one warp's instruction
// stream, which more warps per scheduler hide: at the 0.6B shape 12 x 2 is 1.01-1.12x 8 x 3 with bf16
// weights and 1.25x with int8, at the 8B shape (G = 4) 0.96x with bf16 and 1.12x with int8, whose
// stream has the most instructions a byte (H100; RESULTS.md, "Five decode experiments" and "Timing by
// elimination"); the stages as large either way (24 a block).
template <typename W, int G> constexpr bool WIDE_BLOCK = G <= 2 || (is_int8<W> && G <= 4);
template <typename W, int G> constexpr int DECODE_WARPS = WIDE_BLOCK<W, G> ? 12 : 8;
template <typename W, int G> constexpr int WARP_STAGES = WIDE_BLOCK<W, G> ? 2 : 3;  // stages of a warp's weight stream
template <typename W, int G> constexpr int DECODE_THREADS = DECODE_WARPS<W, G> * 32;
constexpr int GROUP_ROWS = 4;                // rows whose dot products a warp computes at once (x read once)
static_assert(2 * GROUP_ROWS <= 32, "issue_next: a piece's runs of memory (<= 2 x GROUP_ROWS), one a lane");
constexpr int MAX_DECODE_BLOCKS = 1024;

// the blocks' maxima of the logits, for the last block's argmax (module state: one stream at a time;
// each of the file's objects, below, has its own)
static __device__ float decode_block_max[MAX_DECODE_BLOCKS];
static __device__ int decode_block_argmax[MAX_DECODE_BLOCKS];
static __device__ bool decode_block_nonfinite[MAX_DECODE_BLOCKS];

// ---- published values: what one block writes and the others read -------------------------------
//
// A value goes out with the flag of the phase that wrote it, both in one 8-byte store (the value in
// the low half, the flag in the high half; an aligned 8-byte access is single-copy atomic), and a
// reader polls the word itself until it carries the flag it waits for: the value is then the one
// written, without a fence, a counter or a second load (NCCL's LL protocol). Both go through L2
// (.relaxed.gpu), the point of coherence. A flag is (epoch, layer, phase), epoch being the step's
// number (DecodeStep.epoch): a word left by an earlier phase never carries the flag awaited.
enum { PUB_QKV, PUB_PARTIALS, PUB_ATT, PUB_X_MID, PUB_H, PUB_X_OUT, PUB_PER_LAYER };

__host__ __device__ inline uint32_t flags_per_step(int n_layers) { return (uint32_t)n_layers * PUB_PER_LAYER; }
__device__ __forceinline__ uint32_t flag_of(const DecodeStep& p, int l, int phase) {
    return p.epoch * flags_per_step(p.n_layers) + l * PUB_PER_LAYER + phase;
}

// DecodeStep.published: x (dim: the residual stream after attention, then after the MLP), qkv
// (qkv_dim), att (q_dim), h (hidden_dim), the attention partials (attention_scratch_floats()). Each
// is rewritten every layer: before a block writes a layer's value, every reader of the layer before
// has read it (the phases in between wait for every block).
struct Published { uint64_t *x, *qkv, *att, *h, *partials; };
__host__ __device__ inline size_t published_words(const DecodeStep& p, Published* at) {
    const size_t q_dim = (size_t)p.n_heads * p.head_dim, qkv_dim = q_dim + 2 * (size_t)p.n_kv_heads * p.head_dim;
    const size_t partials = (size_t)p.n_heads * attention_n_chunks(p.seq_len) * (p.head_dim + 2);
    uint64_t* base = reinterpret_cast<uint64_t*>(p.published);
    if (at) *at = {base, base + p.dim, base + p.dim + qkv_dim, base + p.dim + qkv_dim + q_dim,
                   base + p.dim + qkv_dim + q_dim + p.hidden_dim};
    return p.dim + qkv_dim + q_dim + p.hidden_dim + partials;
}

__device__ __forceinline__ void publish(uint64_t* slot, float value, uint32_t flag) {
    const uint64_t word = (uint64_t)flag << 32 | __float_as_uint(value);
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" :: "l"(slot), "l"(word) : "memory");
}
__device__ __forceinline__ uint64_t load_word(const uint64_t* slot) {
    uint64_t word;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(word) : "l"(slot) : "memory");
    return word;
}
// The value in `word` (loaded from slot), once slot carries flag: polls until then.
__device__ __forceinline__ float value_when(uint64_t word, const uint64_t* slot, uint32_t flag) {
    while ((uint32_t)(word >> 32) != flag) word = load_word(slot);
    return __uint_as_float((uint32_t)word);
}

// The attention partials as merge_heads reads them (attention.cuh): waited for
struct PublishedPartials {
    const uint64_t* words;
    uint32_t flag;
    __device__ uint64_t fetch(size_t i) const { return load_word(words + i); }
    __device__ float value(uint64_t loaded, size_t i) const { return value_when(loaded, words + i, flag); }
};

// One arrival of `total`; true, in every thread of the block, for the block that arrived last (it
// then sees everything the other blocks wrote before their arrivals).
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned total) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(counter, 1u) == total - 1;
        __threadfence();
    }
    __syncthreads();
    return last;
}

// ---- the weight stream --------------------------------------------------------------------------

// The matrices in the order a step reads them: MATS_PER_LAYER per layer, then the LM head.
enum { MAT_QKV, MAT_O, MAT_GATE_UP, MAT_DOWN, MATS_PER_LAYER };

// A matrix as units of work: unit i is row i (`cols` weights), or for w_gate_up the pair (gate row i,
// up row i), whose dot products silu(gate) * up combines.
template <typename W> struct Units {
    const W* rows;     // unit i's row: rows + i * cols
    const W* up_rows;  // w_gate_up: unit i's up row, up_rows + i * cols; else NULL
    const __half *scales, *up_scales;  // int8: the rows' scales, (count, cols / Q8_BLOCK) each
    int count, cols;
};

// Rows [first, first + count) of a stacked matrix of `cols` columns (its scales: int8)
template <typename W>
__device__ __forceinline__ Units<W> units_of(const void* matrix, const void* scales, size_t first, int count, int cols,
                                             bool paired) {
    const size_t skip = paired ? (size_t)count * cols : 0;  // gate rows, then as many up rows
    const W* rows = (const W*)matrix + first * cols;
    const __half* row_scales = is_int8<W> ? (const __half*)scales + first * cols / Q8_BLOCK : nullptr;
    return {rows, paired ? rows + skip : nullptr, row_scales, paired && is_int8<W> ? row_scales + skip / Q8_BLOCK : nullptr,
            count, cols};
}

template <typename W>
__device__ __forceinline__ Units<W> matrix_units(const DecodeStep& p, int matrix) {
    const size_t D = p.dim, H = p.hidden_dim, Q = (size_t)p.n_heads * p.head_dim;
    const size_t QKV = Q + 2 * (size_t)p.n_kv_heads * p.head_dim;
    const size_t l = matrix / MATS_PER_LAYER;
    if ((int)l == p.n_layers) return units_of<W>(p.lm_head, p.lm_head_scales, 0, p.vocab_size, p.dim, false);
    switch (matrix % MATS_PER_LAYER) {
        case MAT_QKV: return units_of<W>(p.wqkv, p.wqkv_scales, l * QKV, (int)QKV, p.dim, false);
        case MAT_O: return units_of<W>(p.wo, p.wo_scales, l * D, p.dim, (int)Q, false);
        case MAT_GATE_UP: return units_of<W>(p.w_gate_up, p.w_gate_up_scales, l * 2 * H, p.hidden_dim, p.dim, true);
        default: return units_of<W>(p.w_down, p.w_down_scales, l * D, p.dim, p.hidden_dim, false);
    }
}

// This block's units of a matrix of `count`: an even share, contiguous (one run of memory). wo and
// w_down both have dim rows, so a block updates the same rows of x in both, and owns them. Within
// the block, warp w streams an even share of the block's units on its own.
struct Span { int begin, end; };
__device__ __forceinline__ Span block_span(int count) {
    return {(int)((unsigned)count * blockIdx.x / gridDim.x), (int)((unsigned)count * (blockIdx.x + 1) / gridDim.x)};
}
__device__ __forceinline__ Span warp_span(int count) {
    const Span b = block_span(count);
    const unsigned n = b.end - b.begin, w = threadIdx.x / 32;
    const unsigned warps = blockDim.x / 32;
    return {b.begin + (int)(n * w / warps), b.begin + (int)(n * (w + 1) / warps)};
}

// A piece of a warp's weight stream, one stage: `n` units from `unit` (GROUP_ROWS rows at most: 4
// rows, or 2 gate/up pairs) x the columns [col, col + len). The stage holds the n (gate) row
// segments, then the n up row segments, each len weights (int8: then each segment's scales, in
// slots of scale_slot(len) bytes). A row that does not fit a stage whole comes in several pieces
// of 256-column multiples, one after the other, and the warp adds up their dot products in order.
struct Piece { int matrix, unit, n, col, len; };

// int8: the scales of a row segment of len weights are len / 16 bytes, not always starting at a
// 16-byte boundary (a row has cols / 16 bytes of them), and a bulk copy moves 16-byte units: a slot
// holds the aligned run of memory around them (ScaleRun), the scales `offset` bytes into it.
__host__ __device__ constexpr int scale_slot(int len) { return (len / 16 + 15) / 16 * 16 + 16; }
struct ScaleRun { const char* start; uint32_t bytes, offset; };
__device__ __forceinline__ ScaleRun scale_run(const __half* first, int len) {
    const uintptr_t at = (uintptr_t)first, start = at & ~(uintptr_t)15, end = (at + len / 16 + 15) & ~(uintptr_t)15;
    return {(const char*)start, (uint32_t)(end - start), (uint32_t)(at - start)};
}
// ...of the piece's k-th row segment in the stage (the n gate or plain rows, then the n up rows)
template <typename W>
__device__ __forceinline__ ScaleRun piece_scales(const Units<W>& u, const Piece& piece, int k) {
    const __half* scales = k < piece.n ? u.scales : u.up_scales;
    return scale_run(scales + ((size_t)(piece.unit + k % piece.n) * u.cols + piece.col) / Q8_BLOCK, piece.len);
}

// Where a warp is in its stream (the same in every lane): the matrix, the next unit of the warp's
// span of it and the span's end, and the next column of the current group of units.
struct Cursor { int matrix, unit, end, col; };

// The kinds of matrix: MAT_QKV .. MAT_DOWN, and the LM head
constexpr int MAT_KINDS = MATS_PER_LAYER + 1;
__device__ __forceinline__ int matrix_kind(const DecodeStep& p, int matrix) {
    return matrix >= p.n_layers * MATS_PER_LAYER ? MATS_PER_LAYER : matrix % MATS_PER_LAYER;
}

// What a warp's stream needs at every piece, worked out once per step (its divisions would otherwise
// sit on the path of every piece): the warp's span of each kind of matrix (the same in every layer),
// and the columns a stage holds for a piece of r rows, fit[r].
struct StreamPlan { Span span[MAT_KINDS]; int fit[GROUP_ROWS + 1]; };

template <typename W>
__device__ __forceinline__ StreamPlan stream_plan(const DecodeStep& p, int stage_bytes) {
    StreamPlan plan;
    for (int kind = 0; kind < MAT_KINDS; kind++)
        plan.span[kind] = warp_span(matrix_units<W>(p, kind < MATS_PER_LAYER ? kind : p.n_layers * MATS_PER_LAYER).count);
    // len per row; int8 also scale_slot(len) = len / 16 + 16 bytes of scales for len % 256 == 0
    for (int r = 1; r <= GROUP_ROWS; r++) {
        const int row_room = stage_bytes / r;
        plan.fit[r] = (is_int8<W> ? (row_room - 16) * 16 / 17 : row_room / (int)sizeof(W)) / 256 * 256;
    }
    return plan;
}

// The piece at the cursor, and the cursor moved past it; false at the end of the step's stream.
template <typename W>
__device__ __forceinline__ bool next_piece(const DecodeStep& p, const StreamPlan& plan, Cursor& c, Piece& piece) {
    while (c.unit >= c.end) {  // on to the next matrix with units for this warp
        if (++c.matrix > p.n_layers * MATS_PER_LAYER) return false;
        const Span span = plan.span[matrix_kind(p, c.matrix)];
        c = {c.matrix, span.begin, span.end, 0};
    }
    const Units<W> u = matrix_units<W>(p, c.matrix);
    const int rows_per_unit = u.up_rows ? 2 : 1, n = min(GROUP_ROWS / rows_per_unit, c.end - c.unit);
    piece = {c.matrix, c.unit, n, c.col, min(u.cols - c.col, plan.fit[n * rows_per_unit])};
    c.col += piece.len;
    if (c.col == u.cols) {
        c.col = 0;
        c.unit += n;
    }
    return true;
}

// Global -> shared memory by the copy engine, counted on the stage's mbarrier. The weights are read
// once per step: evict_first keeps them from pushing the KV cache out of L2.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], %4;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}

// The runs of memory a piece is copied from, in the order of its stage: run(src, bytes, offset in
// the stage). Whole rows are one run (and their up rows another); a row segment is a run of its own;
// int8 then has each segment's scales (piece_scales).
template <typename W, typename Run>
__device__ __forceinline__ void piece_runs(const DecodeStep& p, const Piece& piece, Run run) {
    const Units<W> u = matrix_units<W>(p, piece.matrix);
    const uint32_t row_bytes = piece.len * sizeof(W), rows = piece.n * (u.up_rows ? 2 : 1);
    const W* src = u.rows + (size_t)piece.unit * u.cols + piece.col;
    const W* up = u.up_rows ? u.up_rows + (size_t)piece.unit * u.cols + piece.col : nullptr;
    if (piece.len == u.cols) {
        run(src, piece.n * row_bytes, 0);
        if (up) run(up, piece.n * row_bytes, piece.n * row_bytes);
    } else {
        for (int i = 0; i < piece.n; i++) {
            run(src + (size_t)i * u.cols, row_bytes, i * row_bytes);
            if (up) run(up + (size_t)i * u.cols, row_bytes, (piece.n + i) * row_bytes);
        }
    }
    if constexpr (is_int8<W>)
        for (int k = 0; k < (int)rows; k++) {
            const ScaleRun scales = piece_scales(u, piece, k);
            run(scales.start, scales.bytes, rows * row_bytes + k * scale_slot(piece.len));
        }
}

// A warp's weight stream: STAGES stages of shared memory, each with an mbarrier that completes a
// phase when the stage's bytes land. Piece k goes to stage k % STAGES; the warp's lanes issue it as
// soon as the warp is done with piece k - STAGES.
template <int STAGES>
struct WarpStream {
    char* stages;     // STAGES x stage_bytes
    uint64_t* full;   // (STAGES)
    int stage_bytes;
    const StreamPlan* plan;  // shared memory
    Cursor issue_at;  // the next piece to issue...
    int issued;
    Cursor consume_at;  // ...and to consume: `next`, if `more`
    Piece next;
    bool more;
    int consumed;
    uint64_t policy;
};

template <typename W, int STAGES>
__device__ void issue_next(const DecodeStep& p, WarpStream<STAGES>& s) {
    Piece piece;
    if (!next_piece<W>(p, *s.plan, s.issue_at, piece)) return;
    const int slot = s.issued++ % STAGES, lane = threadIdx.x % 32;
    // lane k issues the piece's run k (at most 2 x GROUP_ROWS runs), so that its copies go out at once
    // rather than one after the other from lane 0
    const void* src = nullptr;
    uint32_t run_bytes = 0, offset = 0, total = 0;
    int k = 0;
    piece_runs<W>(p, piece, [&](const void* from, uint32_t bytes, uint32_t at) {
        if (k++ == lane) { src = from; run_bytes = bytes; offset = at; }
        total += bytes;
    });
    if (lane == 0) mbar_arrive_expect_tx(&s.full[slot], total);
    __syncwarp();  // the bytes expected before any lands
    if (run_bytes)
        bulk_copy(s.stages + (size_t)slot * s.stage_bytes + offset, src, run_bytes, smem_addr(&s.full[slot]), s.policy);
}

// The warp's pieces of matrix `matrix` (its share of the block's units), in the order issue_next()
// issued them: the dot products of each group of units with v (the matrix's input vector, shared
// memory), then epilogue(unit, dot, up_dot) on lane 0 for each unit (up_dot: the up row's, pairs
// only). Each stage is refilled as soon as the warp is done with it. No other warp is waited for.
template <typename W, bool PAIRED, int STAGES, typename Epilogue>
__device__ void stream_matrix(const DecodeStep& p, WarpStream<STAGES>& s, int matrix, const float* v, Epilogue epilogue) {
    constexpr int ROWS = PAIRED ? 2 : 1;
    const Units<W> u = matrix_units<W>(p, matrix);
    float acc[GROUP_ROWS] = {};
    while (s.more && s.next.matrix == matrix) {
        const Piece piece = s.next;
        const int slot = s.consumed % STAGES;
        mbar_wait(&s.full[slot], (s.consumed / STAGES) & 1);
        const W* stage = (const W*)(s.stages + (size_t)slot * s.stage_bytes);
        const char* scale_slots = (const char*)(stage + (size_t)piece.n * ROWS * piece.len);  // int8
        const W* rows[GROUP_ROWS];
        const __half* scales[GROUP_ROWS] = {};
#pragma unroll
        for (int j = 0; j < GROUP_ROWS / ROWS; j++) {
#pragma unroll
            for (int part = 0; part < ROWS; part++) {  // the gate (or plain) row, then the up row
                const int k = part * piece.n + min(j, piece.n - 1);  // its segment in the stage
                rows[ROWS * j + part] = stage + (size_t)k * piece.len;
                if constexpr (is_int8<W>) {
                    const ScaleRun run = piece_scales(u, piece, k);
                    scales[ROWS * j + part] = (const __half*)(scale_slots + k * scale_slot(piece.len) + run.offset);
                }
            }
        }
        float sums[GROUP_ROWS];
        warp_dot_rows<W, GROUP_ROWS, VIA_PLAIN>(sums, rows, v + piece.col, piece.len, true, piece.n * ROWS, scales);
#pragma unroll
        for (int r = 0; r < GROUP_ROWS; r++) acc[r] += sums[r];
        if (piece.col + piece.len == u.cols) {  // the group's last columns
            if (threadIdx.x % 32 == 0)
#pragma unroll
                for (int j = 0; j < GROUP_ROWS / ROWS; j++)
                    if (j < piece.n) epilogue(piece.unit + j, acc[ROWS * j], acc[ROWS * j + ROWS - 1]);
#pragma unroll
            for (int r = 0; r < GROUP_ROWS; r++) acc[r] = 0.f;
        }
        __syncwarp();  // every lane is done with the stage
        s.consumed++;
        s.more = next_piece<W>(p, *s.plan, s.consume_at, s.next);
        issue_next<W>(p, s);
    }
}

// ---- vectors in shared memory -------------------------------------------------------------------

// The step's critical path waits on L2 (and on DRAM queues deepened by the weight streams), so the
// loops below issue all of a thread's loads (BATCH of them) before the first use, paying the latency
// once per batch instead of once per element.
constexpr int BATCH = 8;

// v (n, shared memory) = the published src (n) once every value carries flag: each thread issues
// all BATCH of its loads before it polls any
__device__ __forceinline__ void load_published(float* v, const uint64_t* src, int n, uint32_t flag) {
    for (int i0 = threadIdx.x; i0 < n; i0 += blockDim.x * BATCH) {
        uint64_t words[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x < n) words[j] = load_word(src + i0 + j * blockDim.x);
#pragma unroll
        for (int j = 0; j < BATCH; j++) {
            const int i = i0 + j * blockDim.x;
            if (i < n) v[i] = value_when(words[j], src + i, flag);
        }
    }
    __syncthreads();
}

// v (n, shared memory) = gain * the published src (n) once every value carries flag, and the returned
// 1 / rms(src): rmsnorm(x) = inv_rms * v, the factor applied to the dot products of v in the
// epilogues. Folded into the wait, the norm costs one block reduction, not a pass of its own over x
// (measured 1.05-1.06x the separate pass at the 0.6B shape).
__device__ __forceinline__ float load_published_normed(float* v, const uint64_t* src, const float* gain, int n,
                                                       uint32_t flag, float eps) {
    float ss = 0.f;
    for (int i0 = threadIdx.x; i0 < n; i0 += blockDim.x * BATCH) {
        uint64_t words[BATCH];
        float g[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x < n) {
                words[j] = load_word(src + i0 + j * blockDim.x);
                g[j] = __ldg(gain + i0 + j * blockDim.x);
            }
#pragma unroll
        for (int j = 0; j < BATCH; j++) {
            const int i = i0 + j * blockDim.x;
            if (i < n) {
                const float x = value_when(words[j], src + i, flag);
                v[i] = x * g[j];
                ss = fmaf(x, x, ss);
            }
        }
    }
    return rsqrtf(block_sum(ss) / n + eps);  // block_sum's barrier also makes v whole for every warp
}

// ---- attention ----------------------------------------------------------------------------------

template <int HD, int G, int WARPS> struct AttentionShared {
    AttendShared<HD, G, WARPS> attend;
    float k_row[HD];  // the new key, normalised and rotated
};

// The attention items of a step (the same in every layer): n_active chunks of chunk_rows rows, of
// the n_chunks the scratch is laid out for, times per_chunk (KV head, subgroup) items. Chunks are at
// least one pass of the block's loads long (a longer chunk costs a round trip to L2 per pass, another
// chunk a merge of its partials).
struct AttentionItems { int n_sub, per_chunk, n_chunks, chunk_rows, n_active; };
template <int HD, int G, int WARPS>
__device__ __forceinline__ AttentionItems attention_items(const DecodeStep& p, int len) {
    const int group = p.n_heads / p.n_kv_heads, n_sub = (group + G - 1) / G, per_chunk = p.n_kv_heads * n_sub;
    constexpr int PASS_ROWS = WARPS * AttendLoads<HD, G>::RPW * AttendLoads<HD, G>::U;
    const int n_chunks = max(1, min(min(attention_n_chunks(p.seq_len), (int)gridDim.x / per_chunk), (len + PASS_ROWS - 1) / PASS_ROWS));
    const int chunk_rows = attention_chunk_rows(len, n_chunks);
    return {n_sub, per_chunk, n_chunks, chunk_rows, (len + chunk_rows - 1) / chunk_rows};
}

// Into L2, the cached rows (those of earlier steps) of this block's attention item in layer l: issued
// a layer ahead, they are there when the item reads them, instead of behind the weight streams in
// DRAM's queues. The first PREFETCH_ROWS rows of the chunk: at long contexts the later passes
// overlap, and more would push the other layers' rows out of L2 (256 rows measured slower at 4096).
constexpr int PREFETCH_ROWS = 128;
template <typename KV, int HD, int G, int WARPS>
__device__ void prefetch_item_rows(const DecodeStep& p, int l, int pos) {
    const AttentionItems it = attention_items<HD, G, WARPS>(p, pos + 1);
    if ((int)blockIdx.x >= it.n_active * it.per_chunk) return;
    const int chunk = blockIdx.x / it.per_chunk, kv_head = blockIdx.x % it.per_chunk / it.n_sub;
    const int start = chunk * it.chunk_rows, end = min(min(start + it.chunk_rows, pos), start + PREFETCH_ROWS);
    constexpr int LINES = (HD * (int)sizeof(KV) + 127) / 128;  // 128-byte lines of a row
    const size_t layer_rows = (size_t)l * p.seq_len * p.n_kv_heads * HD;
    for (int i = threadIdx.x; i < (end - start) * 2 * LINES; i += blockDim.x) {
        const int r = start + i / (2 * LINES), line = i % LINES;
        const KV* cache = (const KV*)((i / LINES) % 2 ? p.v_cache : p.k_cache);
        const char* at = (const char*)(cache + layer_rows + ((size_t)r * p.n_kv_heads + kv_head) * HD) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(at));
    }
}

// Phase 2 of layer l: the (chunk, KV head, subgroup) items of the active chunks, chunk-major (so at a
// short context the items spread over the blocks), as the chain's attention_chunk_kernel and
// qk_norm_rope_kernel compute them, each publishing its partials; then chunk 0's item of each KV head
// and subgroup merges its heads' partials, as attention_merge_kernel, and publishes them as att. At
// most one item runs per block, so every partial that a merge waits for is being computed by another
// block at the same time. The item's rows of the next layer are then prefetched into L2.
template <typename KV, int HD, int G, int WARPS>
__device__ void attention_phase(const DecodeStep& p, const Published& pub, int l, int pos, AttentionShared<HD, G, WARPS>& sh,
                                const float* inv_freq) {
    const int len = pos + 1;
    const AttentionItems it = attention_items<HD, G, WARPS>(p, len);
    const int n_sub = it.n_sub, per_chunk = it.per_chunk, n_chunks = it.n_chunks, n_active = it.n_active;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t layer_rows = (size_t)l * p.seq_len * p.n_kv_heads * HD;
    KV* k_cache = (KV*)p.k_cache + layer_rows;
    KV* v_cache = (KV*)p.v_cache + layer_rows;
    const float k_scale = p.k_scale ? p.k_scale[l] : 1.f, scale = k_scale / sqrtf((float)HD);
    const float* q_norm = p.q_norm ? p.q_norm + (size_t)l * HD : nullptr;
    const float* k_norm = p.k_norm ? p.k_norm + (size_t)l * HD : nullptr;
    const uint64_t* q = pub.qkv;
    const uint64_t* k = q + (size_t)p.n_heads * HD;
    const uint64_t* v = k + (size_t)p.n_kv_heads * HD;
    const uint32_t qkv_flag = flag_of(p, l, PUB_QKV), partials_flag = flag_of(p, l, PUB_PARTIALS), att_flag = flag_of(p, l, PUB_ATT);
    for (int item = blockIdx.x; item < n_active * per_chunk; item += gridDim.x) {
        const int chunk = item / per_chunk, kv_head = item % per_chunk / n_sub;
        const ServedHeads heads = served_heads<G>(kv_head, item % n_sub, p.n_heads, p.n_kv_heads);
        // the served queries: q_norm, RoPE, times the softmax scale (a warp per head)
        constexpr int PER_LANE = (HD + 31) / 32;
        for (int g = warp; g < heads.count; g += WARPS) {
            float* qg = sh.attend.q[g];
            const uint64_t* qh = q + (size_t)(heads.h0 + g) * HD + lane;
            uint64_t words[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) words[j] = load_word(qh + 32 * j);
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) qg[lane + 32 * j] = value_when(words[j], qh + 32 * j, qkv_flag);
            __syncwarp();
            norm_rope_head<KV>(qg, q_norm, HD, pos, p.theta, p.eps, nullptr, 1.f, inv_freq);
            __syncwarp();
            for (int i = lane; i < HD; i += 32) qg[i] *= scale;
        }
        // the chunk holding row pos: k_norm and RoPE of the new key; k / k_scale and v stored there
        if (chunk == n_active - 1 && warp == WARPS - 1) {
            const size_t row = ((size_t)pos * p.n_kv_heads + kv_head) * HD;
            const uint64_t *kh = k + (size_t)kv_head * HD + lane, *vh = v + (size_t)kv_head * HD + lane;
            uint64_t k_words[PER_LANE], v_words[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) {
                    k_words[j] = load_word(kh + 32 * j);
                    v_words[j] = load_word(vh + 32 * j);
                }
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) {
                    sh.k_row[lane + 32 * j] = value_when(k_words[j], kh + 32 * j, qkv_flag);
                    v_cache[row + lane + 32 * j] = from_float<KV>(value_when(v_words[j], vh + 32 * j, qkv_flag));
                }
            __syncwarp();
            norm_rope_head<KV>(sh.k_row, k_norm, HD, pos, p.theta, p.eps, k_cache + row, k_scale, inv_freq);
        }
        __syncthreads();  // the queries and the block's own cache row are written
        attend_chunk<KV, HD, G, WARPS>(sh.attend, [&](int h, int d, float m, float l_sum, float acc) {
            uint64_t* partial = pub.partials + partial_at(h, chunk, n_chunks, HD);
            if (d == 0) { publish(partial, m, partials_flag); publish(partial + 1, l_sum, partials_flag); }
            publish(partial + 2 + d, acc, partials_flag);
        }, k_cache, v_cache, kv_head, heads, chunk, len, n_chunks, p.n_kv_heads);
        // chunk 0's item: its heads merged from every active chunk's partials into att
        if (chunk == 0)
            merge_heads(PublishedPartials{pub.partials, partials_flag},
                        [&](int h, int d, float value) { publish(pub.att + (size_t)h * HD + d, value, att_flag); },
                        heads.h0, heads.count, len, n_chunks, HD);
    }
    if (l + 1 < p.n_layers) prefetch_item_rows<KV, HD, G, WARPS>(p, l + 1, pos);
}

// ---- the step -----------------------------------------------------------------------------------

// Dynamic shared memory: the warps' stages, then the work area (work_floats: the input vector of a
// phase, max(dim, q_dim, hidden_dim) floats, or in phase 2 the attention state), then the block's
// rows of x (ceil(dim / blocks) floats).
template <typename W, typename KV, int HD, int G>
__global__ void __launch_bounds__(DECODE_THREADS<W, G>, 1)
decode_step_kernel(const DecodeStep p, int host_token, int host_pos, int* result, int stage_bytes, int work_floats) {
    extern __shared__ __align__(128) char smem[];
    constexpr int WARPS = DECODE_WARPS<W, G>, STAGES = WARP_STAGES<W, G>;
    __shared__ __align__(8) uint64_t full[WARPS][STAGES];
    __shared__ float inv_freq[HD / 2];  // RoPE's, once per step rather than once per attention item
    __shared__ StreamPlan plans[WARPS];
    const int D = p.dim, q_dim = p.n_heads * HD, L = p.n_layers, warp = threadIdx.x / 32;
    // the token and its position: the host's, or the step before's argmax and position + 1 (greedy)
    const int token = host_token >= 0 ? host_token : p.io[0], pos = host_token >= 0 ? host_pos : p.io[1];
    if (token < 0 || token >= p.vocab_size || pos < 0 || pos >= p.seq_len) {  // the step before stopped on a NaN
        if (blockIdx.x == 0 && threadIdx.x == 0) p.io[0] = p.io[2] = *result = -1;
        return;
    }
    WarpStream<STAGES> s;
    s.stages = smem + (size_t)warp * STAGES * stage_bytes;
    s.full = full[warp];
    s.stage_bytes = stage_bytes;
    s.plan = &plans[warp];
    s.issue_at = s.consume_at = {-1, 0, 0, 0};
    s.issued = s.consumed = 0;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(s.policy));
    float* v = reinterpret_cast<float*>(smem + (size_t)WARPS * STAGES * stage_bytes);
    const Span own = block_span(D);
    float* x_own = v + work_floats;  // (own.end - own.begin) the block's rows of the residual stream
    Published pub;
    published_words(p, &pub);
    AttentionShared<HD, G, WARPS>& att_sh = *reinterpret_cast<AttentionShared<HD, G, WARPS>*>(v);
    if (threadIdx.x % 32 == 0) {
        plans[warp] = stream_plan<W>(p, stage_bytes);
        for (int i = 0; i < STAGES; i++) mbar_init(&s.full[i], 1);
        mbar_init_fence();
    }
    for (int i = threadIdx.x; i < HD / 2; i += blockDim.x) inv_freq[i] = rope_inv_freq(i, HD, p.theta);
    __syncthreads();
    s.more = next_piece<W>(p, *s.plan, s.consume_at, s.next);
    for (int i = 0; i < STAGES; i++) issue_next<W>(p, s);  // the weights stream in from here on
    prefetch_item_rows<KV, HD, G, WARPS>(p, 0, pos);  // layer 0's attention rows (later layers': phase 2)

    // 0. x = embedding[token]: every block keeps rms_att[0] * x (layer 0's rmsnorm needs all of it) and
    // its own rows of x
    const size_t embedding_row = (size_t)token * D;
    float ss = 0.f;  // sum of squares of x
    for (int i0 = threadIdx.x; i0 < D; i0 += blockDim.x * BATCH) {
        float e[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x < D)
                e[j] = weight_at((const W*)p.embedding, (const __half*)p.embedding_scales, embedding_row + i0 + j * blockDim.x);
#pragma unroll
        for (int j = 0; j < BATCH; j++) {
            const int i = i0 + j * blockDim.x;
            if (i < D) {
                v[i] = e[j] * __ldg(p.rms_att + i);
                ss = fmaf(e[j], e[j], ss);
                if (i >= own.begin && i < own.end) x_own[i - own.begin] = e[j];
            }
        }
    }
    // x_own[row] += dot, published with the flag of phase `phase` of layer l (the residual adds of 3 and 5)
    auto add_to_x = [&](int l, int phase) {
        return [&, l, phase](int row, float dot, float) {
            const float x = x_own[row - own.begin] += dot;
            publish(pub.x + row, x, flag_of(p, l, phase));
        };
    };
    float inv_rms = rsqrtf(block_sum(ss) / D + p.eps);  // of the RMSNorm ahead
    for (int l = 0; l < L; l++) {
        // 1. qkv = wqkv . rmsnorm(x) + bqkv, as (wqkv . (rms_att * x)) * inv_rms
        if (l > 0) inv_rms = load_published_normed(v, pub.x, p.rms_att + (size_t)l * D, D, flag_of(p, l - 1, PUB_X_OUT), p.eps);
        const float* bias = p.bqkv ? p.bqkv + (size_t)l * (q_dim + 2 * p.n_kv_heads * HD) : nullptr;
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_QKV, v, [&](int row, float dot, float) {
            publish(pub.qkv + row, dot * inv_rms + (bias ? bias[row] : 0.f), flag_of(p, l, PUB_QKV));
        });
        // 2. att = attention(rope(qk_norm(q)), K, V), with rope(k_norm(k)) / k_scale and v stored at row pos
        __syncthreads();  // the work area becomes the attention's
        attention_phase<KV, HD, G, WARPS>(p, pub, l, pos, att_sh, inv_freq);
        // 3. x += wo . att
        load_published(v, pub.att, q_dim, flag_of(p, l, PUB_ATT));
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_O, v, add_to_x(l, PUB_X_MID));
        // 4. h = silu(gate . rmsnorm(x)) * (up . rmsnorm(x)), the 1/rms applied to both dot products
        __syncthreads();  // every warp is done with att
        inv_rms = load_published_normed(v, pub.x, p.rms_ffn + (size_t)l * D, D, flag_of(p, l, PUB_X_MID), p.eps);
        stream_matrix<W, true>(p, s, l * MATS_PER_LAYER + MAT_GATE_UP, v, [&](int i, float gate, float up) {
            gate *= inv_rms;
            publish(pub.h + i, gate / (1.f + expf(-gate)) * (up * inv_rms), flag_of(p, l, PUB_H));
        });
        // 5. x += w_down . h
        __syncthreads();  // every warp is done with rmsnorm(x)
        load_published(v, pub.h, p.hidden_dim, flag_of(p, l, PUB_H));
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_DOWN, v, add_to_x(l, PUB_X_OUT));
        __syncthreads();  // every warp is done with h
    }
    // 6. logits = lm_head . rmsnorm(x), and their argmax (-1 if any logit is NaN or inf, as argmax_gpu)
    inv_rms = load_published_normed(v, pub.x, p.rms_final, D, flag_of(p, L - 1, PUB_X_OUT), p.eps);
    float best = -INFINITY;
    int best_index = INT_MAX;  // loses every tie with a real index
    bool nonfinite = false;
    stream_matrix<W, false>(p, s, L * MATS_PER_LAYER, v, [&](int row, float dot, float) {
        dot *= inv_rms;
        p.logits[row] = dot;
        nonfinite |= !isfinite(dot);
        if (argmax_better(dot, row, best, best_index)) { best = dot; best_index = row; }
    });
    const ArgmaxPartials partials = {decode_block_max, decode_block_argmax, decode_block_nonfinite};
    store_block_argmax(partials, best, best_index, nonfinite);
    if (arrive_last(p.blocks_done, gridDim.x)) {  // the last block: every other one is done
        const int next = reduce_block_argmax(partials, gridDim.x);
        if (threadIdx.x == 0) {  // the argmax (no copies are in flight now: the fence is cheap)
            *p.blocks_done = 0;  // for the next step
            p.io[0] = next;
            p.io[1] = pos + 1;
            p.io[2] = next;
            *result = next;
            __threadfence_system();
        }
    }
}

// ---- launcher -----------------------------------------------------------------------------------

struct DecodeLaunch { int stage_bytes, blocks, work_floats; size_t smem; };

// The stages for this shape: the shared memory left beside the work area and the block's rows of x,
// split evenly over the warps' stages. A stage must hold GROUP_ROWS rows of a 256-column stretch
// (else stage_bytes is 0: the shape does not fit).
template <typename W, typename KV, int HD, int G>
static DecodeLaunch decode_launch(const DecodeStep* p) {
    auto kernel = decode_step_kernel<W, KV, HD, G>;
    const int q_dim = p->n_heads * HD;
    int device, optin, sms;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cudaFuncAttributes attributes;
    CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    const size_t work = (std::max((size_t)std::max({p->dim, q_dim, p->hidden_dim}) * sizeof(float),
                                  sizeof(AttentionShared<HD, G, DECODE_WARPS<W, G>>)) + 15) / 16 * 16;
    DecodeLaunch c;
    c.blocks = std::min(sms, MAX_DECODE_BLOCKS);
    const size_t rest = work + (size_t)(p->dim + c.blocks - 1) / c.blocks * 4;  // + the own rows of x
    const long room = (long)optin - (long)attributes.sharedSizeBytes - (long)rest;
    c.work_floats = (int)(work / sizeof(float));
    constexpr int BLOCK_STAGES = DECODE_WARPS<W, G> * WARP_STAGES<W, G>;
    c.stage_bytes = room > 0 ? (int)(room / BLOCK_STAGES / 128 * 128) : 0;
    if (c.stage_bytes < GROUP_ROWS * (256 * (int)sizeof(W) + (is_int8<W> ? scale_slot(256) : 0))) c.stage_bytes = 0;
    c.smem = (size_t)BLOCK_STAGES * c.stage_bytes + rest;
    return c;
}

template <typename W, typename KV, int HD, int G>
static int launch_decode(const DecodeStep* p, bool launch, int token, int pos, int* result, cudaStream_t stream) {
    static DecodeLaunch c;  // worked out once per instantiation: the shape is the model's
    static bool configured = false;
    auto kernel = decode_step_kernel<W, KV, HD, G>;
    if (!configured) {
        c = decode_launch<W, KV, HD, G>(p);
        if (c.stage_bytes > 0) {
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)c.smem));
            int per_sm = 0;
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, DECODE_THREADS<W, G>, c.smem));
            if (per_sm < 1) c.stage_bytes = 0;
        }
        configured = true;
    }
    if (!launch || c.stage_bytes == 0) return c.stage_bytes;
    // cooperative: every block resident at once (they wait for each other), or the launch fails
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    cudaLaunchConfig_t config = {dim3(c.blocks), dim3(DECODE_THREADS<W, G>), c.smem, stream, &attribute, 1};
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, *p, token, pos, result, c.stage_bytes, c.work_floats));
    return c.stage_bytes;
}

// The kernel exists for every weight dtype x KV dtype x head size x group cap: 120 instantiations, by
// far the longest compile of the build. So the Makefile compiles this file once per weight dtype,
// DECODE_PART 0 instantiating the bf16 weights' kernels (and holding the entry points), 1 the fp16,
// 2 the fp32 and 3 the int8 ones: `make -j` builds them side by side.
template <typename W>
int dispatch_decode_w(const DecodeStep* p, bool launch, int token, int pos, int* result, cudaStream_t stream) {
    int stages = 0;
#define DECODE_FOR(KV) \
    DISPATCH_GROUP(p->n_heads / p->n_kv_heads, DISPATCH_HD(p->head_dim, \
        (stages = launch_decode<W, KV, HD, G>(p, launch, token, pos, result, stream))))
    if (p->kv_dtype == DT_BF16) { DECODE_FOR(__nv_bfloat16) } else { DECODE_FOR(__half) }
#undef DECODE_FOR
    return stages;
}
#ifndef DECODE_PART
#error "compile decode.cu with -DDECODE_PART=0, 1, 2 and 3 (Makefile)"
#endif
#define DECODE_INSTANCE(EXTERN, W) EXTERN template int dispatch_decode_w<W>(const DecodeStep*, bool, int, int, int*, cudaStream_t);
#if DECODE_PART == 0
DECODE_INSTANCE(, __nv_bfloat16)
DECODE_INSTANCE(extern, __half)
DECODE_INSTANCE(extern, float)
DECODE_INSTANCE(extern, int8_t)

static int dispatch_decode(const DecodeStep* p, bool launch, int token, int pos, int* result, cudaStream_t stream) {
    check_attention_shape(p->kv_dtype, p->n_heads, p->n_kv_heads, p->head_dim, "decode_step_gpu");
    if (p->wdtype != DT_F32 && p->wdtype != DT_BF16 && p->wdtype != DT_F16 && p->wdtype != DT_INT8) {
        fprintf(stderr, "error: decode_step_gpu: unknown weight dtype %d\n", p->wdtype);
        exit(1);
    }
    const int q_dim = p->n_heads * p->head_dim;
    if (p->wdtype == DT_INT8 && (p->dim % Q8_BLOCK || p->hidden_dim % Q8_BLOCK || q_dim % Q8_BLOCK)) {
        fprintf(stderr, "error: decode_step_gpu: int8 weights need dim, hidden_dim and q_dim multiples of %d\n", Q8_BLOCK);
        exit(1);
    }
    int stages = 0;
    DISPATCH_W(p->wdtype, stages = dispatch_decode_w<W>(p, launch, token, pos, result, stream));
    return stages;
}

extern "C" size_t decode_published_words(const DecodeStep* step) { return published_words(*step, nullptr); }

extern "C" int decode_step_stage_bytes(const DecodeStep* step) {
    return dispatch_decode(step, false, 0, 0, nullptr, nullptr);
}

extern "C" void decode_step_gpu(DecodeStep* step, int token, int pos, int* result, cudaStream_t stream) {
    // a new epoch, so new flags; before the flags would wrap around, the words go back to zero (a flag
    // no step uses: epochs start at 1)
    if (step->epoch >= UINT32_MAX / flags_per_step(step->n_layers) - 1) {
        CUDA_CHECK(cudaMemsetAsync(step->published, 0, decode_published_words(step) * sizeof(uint64_t), stream));
        step->epoch = 0;
    }
    step->epoch++;
    if (dispatch_decode(step, true, token, pos, result, stream) == 0) {
        fprintf(stderr, "error: decode_step_gpu: this shape does not fit the persistent kernel (decode_step_stage_bytes)\n");
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}
#elif DECODE_PART == 1
DECODE_INSTANCE(, __half)
#elif DECODE_PART == 2
DECODE_INSTANCE(, float)
#else
DECODE_INSTANCE(, int8_t)
#endif
