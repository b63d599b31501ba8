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
//   lane 0 issues a bulk copy (cp.async.bulk, completing on the stage's mbarrier) for the next piece
//   as soon as the warp is done with a stage. No warp waits for another to stream, and weights do not
//   depend on the activations, so the copies run ahead of the math across the phase boundaries while
//   the block waits for the others: the memory does not idle.
// Activations: a phase that needs a whole vector (x, att or h) waits until every block has
//   published its part of it: a counter per layer and phase, one increment per block, polled by
//   one thread (a split barrier: a block that is done moves on to wait, its weights streaming in).
//   Data written by one block and read by another goes through L2 (VIA_L2, common.cuh).
//
// The phases, one comment each in decode_step_kernel:
//   0. x = embedding[token]
//   per layer:
//   1. qkv = wqkv . rmsnorm(x) + bqkv          every block its rows; each block computes rms(x) itself
//   2. attention                               (chunk, KV head) items over the blocks (attention.cuh); an
//                                              item normalises and rotates its queries itself, the item
//                                              holding row pos stores K and V there, and the last item of
//                                              a KV head to finish merges its heads into att
//   3. x += wo . att
//   4. h = silu(gate . rmsnorm(x)) * (up . rmsnorm(x))
//   5. x += w_down . h
//   6. logits = lm_head . rmsnorm(x) and their argmax; the last block to finish reduces the blocks'
//      maxima, leaves (argmax, pos + 1) as the next step's input and zeroes the counters.
#include <algorithm>
#include "attention.cuh"

constexpr int DECODE_THREADS = 256;
constexpr int DECODE_WARPS = DECODE_THREADS / 32;
// The thread that signals and polls the other blocks' counters: not a lane 0, which issue the weight
// copies, as a fence may wait for the thread's memory operations in flight.
constexpr int SIGNAL_THREAD = 1;
constexpr int WARP_STAGES = 3;               // shared-memory stages of each warp's weight stream
constexpr int GROUP_ROWS = 4;                // rows whose dot products a warp computes at once (x read once)
constexpr int MAX_DECODE_BLOCKS = 1024;

// the blocks' maxima of the logits, for the last block's argmax (module state: one stream at a time;
// each of the file's two objects, below, has its own)
static __device__ float decode_block_max[MAX_DECODE_BLOCKS];
static __device__ int decode_block_argmax[MAX_DECODE_BLOCKS];
static __device__ bool decode_block_nonfinite[MAX_DECODE_BLOCKS];

// ---- synchronisation between blocks -------------------------------------------------------------

// DecodeStep.sync: per layer one counter per phase, then per layer one counter per KV head (its
// attention items), then one for the LM head. All zero when a step starts.
enum { SYNC_QKV, SYNC_ATT, SYNC_O, SYNC_GATE_UP, SYNC_DOWN, SYNC_PER_LAYER };

__host__ __device__ inline size_t sync_words(int n_layers, int n_kv_heads) {
    return (size_t)n_layers * (SYNC_PER_LAYER + n_kv_heads) + 1;
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// The block's writes of a phase are done: one arrival, after a fence, so whoever sees the count sees them.
__device__ __forceinline__ void publish(unsigned* counter) {
    __syncthreads();
    if (threadIdx.x == SIGNAL_THREAD) {
        __threadfence();
        atomicAdd(counter, 1u);
    }
}

// Until `count` arrivals: one thread polls, the block waits for it.
__device__ __forceinline__ void wait_for(const unsigned* counter, unsigned count) {
    if (threadIdx.x == SIGNAL_THREAD) {
        while (load_acquire(counter) < count) {}
        __threadfence();
    }
    __syncthreads();
}

// One arrival of `total`; true, in every thread of the block, for the block that arrived last (it
// then sees everything published before the other arrivals).
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned total) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == SIGNAL_THREAD) {
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
    return {b.begin + (int)(n * w / DECODE_WARPS), b.begin + (int)(n * (w + 1) / DECODE_WARPS)};
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

// The piece at the cursor, and the cursor moved past it; false at the end of the step's stream.
template <typename W>
__device__ __forceinline__ bool next_piece(const DecodeStep& p, Cursor& c, int stage_bytes, Piece& piece) {
    while (c.unit >= c.end) {  // on to the next matrix with units for this warp
        if (++c.matrix > p.n_layers * MATS_PER_LAYER) return false;
        const Span span = warp_span(matrix_units<W>(p, c.matrix).count);
        c = {c.matrix, span.begin, span.end, 0};
    }
    const Units<W> u = matrix_units<W>(p, c.matrix);
    const int rows_per_unit = u.up_rows ? 2 : 1, n = min(GROUP_ROWS / rows_per_unit, c.end - c.unit);
    // the columns a stage holds: len per row, int8 also scale_slot(len) = len / 16 + 16 for len % 256 == 0
    const int row_room = stage_bytes / (n * rows_per_unit);
    const int fit = (is_int8<W> ? (row_room - 16) * 16 / 17 : row_room / (int)sizeof(W)) / 256 * 256;
    piece = {c.matrix, c.unit, n, c.col, min(u.cols - c.col, fit)};
    c.col += piece.len;
    if (c.col == u.cols) {
        c.col = 0;
        c.unit += n;
    }
    return true;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// Global -> shared memory by the copy engine, counted on the stage's mbarrier. The weights are read
// once per step: evict_first keeps them from pushing the KV cache out of L2.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint32_t bar, uint64_t policy) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], %4;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}

// A warp's weight stream: WARP_STAGES stages of shared memory, each with an mbarrier that completes
// a phase when the stage's bytes land. Piece k goes to stage k % WARP_STAGES; lane 0 issues it as
// soon as the warp is done with piece k - WARP_STAGES.
struct WarpStream {
    char* stages;     // WARP_STAGES x stage_bytes
    uint64_t* full;   // (WARP_STAGES)
    int stage_bytes;
    Cursor issue_at;  // the next piece to issue...
    int issued;
    Cursor consume_at;  // ...and to consume: `next`, if `more`
    Piece next;
    bool more;
    int consumed;
    uint64_t policy;
};

template <typename W>
__device__ void issue_next(const DecodeStep& p, WarpStream& s) {
    Piece piece;
    if (!next_piece<W>(p, s.issue_at, s.stage_bytes, piece)) return;
    const int slot = s.issued++ % WARP_STAGES;
    if (threadIdx.x % 32 == 0) {
        const Units<W> u = matrix_units<W>(p, piece.matrix);
        const uint32_t bar = smem_addr(&s.full[slot]), row_bytes = piece.len * sizeof(W);
        const uint32_t rows = piece.n * (u.up_rows ? 2 : 1);
        char* dst = s.stages + (size_t)slot * s.stage_bytes;
        uint32_t bytes = rows * row_bytes;
        if constexpr (is_int8<W>)
            for (int k = 0; k < (int)rows; k++) bytes += piece_scales(u, piece, k).bytes;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
        const W* src = u.rows + (size_t)piece.unit * u.cols + piece.col;
        const W* up = u.up_rows ? u.up_rows + (size_t)piece.unit * u.cols + piece.col : nullptr;
        if (piece.len == u.cols) {  // whole rows: one run of memory
            bulk_copy(dst, src, piece.n * row_bytes, bar, s.policy);
            if (u.up_rows) bulk_copy(dst + piece.n * row_bytes, up, piece.n * row_bytes, bar, s.policy);
        } else {
            for (int i = 0; i < piece.n; i++) {
                bulk_copy(dst + i * row_bytes, src + (size_t)i * u.cols, row_bytes, bar, s.policy);
                if (u.up_rows)
                    bulk_copy(dst + (piece.n + i) * row_bytes, up + (size_t)i * u.cols, row_bytes, bar, s.policy);
            }
        }
        if constexpr (is_int8<W>)
            for (int k = 0; k < (int)rows; k++) {
                const ScaleRun run = piece_scales(u, piece, k);
                bulk_copy(dst + rows * row_bytes + k * scale_slot(piece.len), run.start, run.bytes, bar, s.policy);
            }
    }
}

__device__ __forceinline__ void wait_stage(uint64_t* full, int parity) {
    uint32_t done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(smem_addr(full)), "r"(parity) : "memory");
    } while (!done);
}

// The warp's pieces of matrix `matrix` (its share of the block's units), in the order issue_next()
// issued them: the dot products of each group of units with v (the matrix's input vector, shared
// memory), then epilogue(unit, dot, up_dot) on lane 0 for each unit (up_dot: the up row's, pairs
// only). Each stage is refilled as soon as the warp is done with it. No other warp is waited for.
template <typename W, bool PAIRED, typename Epilogue>
__device__ void stream_matrix(const DecodeStep& p, WarpStream& s, int matrix, const float* v, Epilogue epilogue) {
    constexpr int ROWS = PAIRED ? 2 : 1;
    const Units<W> u = matrix_units<W>(p, matrix);
    float acc[GROUP_ROWS] = {};
    while (s.more && s.next.matrix == matrix) {
        const Piece piece = s.next;
        const int slot = s.consumed % WARP_STAGES;
        wait_stage(&s.full[slot], (s.consumed / WARP_STAGES) & 1);
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
        s.more = next_piece<W>(p, s.consume_at, s.stage_bytes, s.next);
        issue_next<W>(p, s);
    }
}

// ---- vectors in shared memory -------------------------------------------------------------------

// The step's critical path waits on L2 (and on DRAM queues deepened by the weight streams), so the
// loops below issue all of a thread's loads (BATCH of them) before the first use, paying the latency
// once per batch instead of once per element.
constexpr int BATCH = 8;

// v (n) = src (n) written by other blocks (through L2); n % 4 == 0, src 16-byte aligned
__device__ __forceinline__ void load_vector(float* v, const float* src, int n) {
    for (int i0 = threadIdx.x * 4; i0 < n; i0 += blockDim.x * 4 * BATCH) {
        float4 x[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x * 4 < n) x[j] = __ldcg(reinterpret_cast<const float4*>(src + i0 + j * blockDim.x * 4));
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x * 4 < n) *reinterpret_cast<float4*>(v + i0 + j * blockDim.x * 4) = x[j];
    }
    __syncthreads();
}

// dst (n floats, shared memory) = src (n, 16-byte aligned, n % 4 == 0) by asynchronous 16-byte copies:
// issued before a wait, they land while the block waits; copy_vector_wait() completes them. (The
// norm weights: they do not depend on the other blocks, so their round trip need not follow the wait.)
__device__ __forceinline__ void copy_vector_async(float* dst, const float* src, int n) {
    for (int i = threadIdx.x * 4; i < n; i += blockDim.x * 4)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst + i)), "l"(src + i) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void copy_vector_wait() {
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
}

// v = v * rsqrt(mean(v^2) + eps) * weight, as rmsnorm.cu; weight in shared memory
__device__ __forceinline__ void rmsnorm_in_place(float* v, const float* weight, int n, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(v[i], v[i], ss);
    const float inv_rms = rsqrtf(block_sum(ss) / n + eps);
    for (int i0 = threadIdx.x; i0 < n; i0 += blockDim.x * BATCH) {
        float w[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++) w[j] = i0 + j * blockDim.x < n ? weight[i0 + j * blockDim.x] : 0.f;
#pragma unroll
        for (int j = 0; j < BATCH; j++)
            if (i0 + j * blockDim.x < n) v[i0 + j * blockDim.x] = v[i0 + j * blockDim.x] * inv_rms * w[j];
    }
    __syncthreads();
}

// ---- attention ----------------------------------------------------------------------------------

template <int HD, int G> struct AttentionShared {
    AttendShared<HD, G, DECODE_WARPS> attend;
    float k_row[HD];  // the new key, normalised and rotated
};

// Phase 2 of layer l: the (chunk, KV head, subgroup) items of the active chunks, chunk-major (so at a
// short context the items spread over all blocks), as the chain's attention_chunk_kernel and
// qk_norm_rope_kernel compute them; then, by the last item of each KV head, attention_merge_kernel's
// merge of its query heads into att, and one arrival on SYNC_ATT.
template <typename KV, int HD, int G>
__device__ void attention_phase(const DecodeStep& p, int l, int pos, AttentionShared<HD, G>& sh,
                                const float* inv_freq) {
    const int group = p.n_heads / p.n_kv_heads, n_sub = (group + G - 1) / G, per_chunk = p.n_kv_heads * n_sub;
    // about one item per block: chunks as long as the context needs, so that a block reads its rows
    // in one item rather than paying an item's round trips several times (at most the chain's
    // chunk count, which sizes the scratch)
    const int n_chunks = max(1, min(attention_n_chunks(p.seq_len), (int)gridDim.x / per_chunk)), len = pos + 1;
    const int chunk_rows = attention_chunk_rows(len, n_chunks), n_active = (len + chunk_rows - 1) / chunk_rows;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t layer_rows = (size_t)l * p.seq_len * p.n_kv_heads * HD;
    KV* k_cache = (KV*)p.k_cache + layer_rows;
    KV* v_cache = (KV*)p.v_cache + layer_rows;
    const float k_scale = p.k_scale ? p.k_scale[l] : 1.f, scale = k_scale / sqrtf((float)HD);
    const float* q_norm = p.q_norm ? p.q_norm + (size_t)l * HD : nullptr;
    const float* k_norm = p.k_norm ? p.k_norm + (size_t)l * HD : nullptr;
    const float* q = p.qkv;
    const float* k = q + (size_t)p.n_heads * HD;
    const float* v = k + (size_t)p.n_kv_heads * HD;
    unsigned* items_done = p.sync + (size_t)p.n_layers * SYNC_PER_LAYER + (size_t)l * p.n_kv_heads;
    for (int item = blockIdx.x; item < n_active * per_chunk; item += gridDim.x) {
        const int chunk = item / per_chunk, kv_head = item % per_chunk / n_sub;
        const ServedHeads heads = served_heads<G>(kv_head, item % n_sub, p.n_heads, p.n_kv_heads);
        // the served queries: q_norm, RoPE, times the softmax scale (a warp per head)
        constexpr int PER_LANE = (HD + 31) / 32;
        for (int g = warp; g < heads.count; g += DECODE_WARPS) {
            float* qg = sh.attend.q[g];
            float t[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) t[j] = __ldcg(q + (size_t)(heads.h0 + g) * HD + lane + 32 * j);
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) qg[lane + 32 * j] = t[j];
            __syncwarp();
            norm_rope_head<KV>(qg, q_norm, HD, pos, p.theta, p.eps, nullptr, 1.f, inv_freq);
            __syncwarp();
            for (int i = lane; i < HD; i += 32) qg[i] *= scale;
        }
        // the chunk holding row pos: k_norm and RoPE of the new key; k / k_scale and v stored there
        if (chunk == n_active - 1 && warp == DECODE_WARPS - 1) {
            const size_t row = ((size_t)pos * p.n_kv_heads + kv_head) * HD;
            float tk[PER_LANE], tv[PER_LANE];
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) {
                    tk[j] = __ldcg(k + (size_t)kv_head * HD + lane + 32 * j);
                    tv[j] = __ldcg(v + (size_t)kv_head * HD + lane + 32 * j);
                }
#pragma unroll
            for (int j = 0; j < PER_LANE; j++)
                if (lane + 32 * j < HD) {
                    sh.k_row[lane + 32 * j] = tk[j];
                    v_cache[row + lane + 32 * j] = from_float<KV>(tv[j]);
                }
            __syncwarp();
            norm_rope_head<KV>(sh.k_row, k_norm, HD, pos, p.theta, p.eps, k_cache + row, k_scale, inv_freq);
        }
        __syncthreads();  // the queries and the block's own cache row are written
        attend_chunk<KV, HD, G, DECODE_WARPS>(sh.attend, p.scratch, k_cache, v_cache, kv_head, heads, chunk, len, n_chunks,
                                p.n_kv_heads);
        // the last item of the KV head to finish: its query heads' partials merged into att
        if (arrive_last(&items_done[kv_head], n_active * n_sub)) {
            for (int h = kv_head * group; h < (kv_head + 1) * group; h++)
                merge_head(p.att + (size_t)h * HD, p.scratch + (size_t)h * n_chunks * (HD + 2), len, n_chunks, HD);
            publish(p.sync + (size_t)l * SYNC_PER_LAYER + SYNC_ATT);
        }
    }
}

// ---- the step -----------------------------------------------------------------------------------

// Dynamic shared memory: the warps' stages, then the work area (work_floats: the input vector of a
// phase, max(dim, q_dim, hidden_dim) floats, or in phase 2 the attention state), then dim floats for
// the RMSNorm weights.
template <typename W, typename KV, int HD, int G>
__global__ void __launch_bounds__(DECODE_THREADS, 1)
decode_step_kernel(const DecodeStep p, int host_token, int host_pos, int* result, int stage_bytes, int work_floats) {
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) uint64_t full[DECODE_WARPS][WARP_STAGES];
    __shared__ float inv_freq[HD / 2];  // RoPE's, once per step rather than once per attention item
    const int D = p.dim, q_dim = p.n_heads * HD, L = p.n_layers, warp = threadIdx.x / 32;
    // the token and its position: the host's, or the step before's argmax and position + 1 (greedy)
    const int token = host_token >= 0 ? host_token : p.io[0], pos = host_token >= 0 ? host_pos : p.io[1];
    if (token < 0 || token >= p.vocab_size || pos < 0 || pos >= p.seq_len) {  // the step before stopped on a NaN
        if (blockIdx.x == 0 && threadIdx.x == 0) p.io[0] = p.io[2] = *result = -1;
        return;
    }
    WarpStream s;
    s.stages = smem + (size_t)warp * WARP_STAGES * stage_bytes;
    s.full = full[warp];
    s.stage_bytes = stage_bytes;
    s.issue_at = s.consume_at = {-1, 0, 0, 0};
    s.issued = s.consumed = 0;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(s.policy));
    float* v = reinterpret_cast<float*>(smem + (size_t)DECODE_WARPS * WARP_STAGES * stage_bytes);
    float* norm = v + work_floats;  // (dim) the RMSNorm weights of the next norm
    AttentionShared<HD, G>& att_sh = *reinterpret_cast<AttentionShared<HD, G>*>(v);
    if (threadIdx.x % 32 == 0) {
        for (int i = 0; i < WARP_STAGES; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&s.full[i])) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
    }
    for (int i = threadIdx.x; i < HD / 2; i += blockDim.x) inv_freq[i] = rope_inv_freq(i, HD, p.theta);
    __syncthreads();
    s.more = next_piece<W>(p, s.consume_at, stage_bytes, s.next);
    for (int i = 0; i < WARP_STAGES; i++) issue_next<W>(p, s);  // the weights stream in from here on

    // 0. x = embedding[token]: every block keeps it (layer 0's rmsnorm needs all of it) and stores the
    //    rows of x it owns
    const size_t embedding_row = (size_t)token * D;
    const Span own = block_span(D);
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
                v[i] = e[j];
                if (i >= own.begin && i < own.end) p.x[i] = v[i];
            }
        }
    }
    for (int l = 0; l < L; l++) {
        unsigned* sync = p.sync + (size_t)l * SYNC_PER_LAYER;
        // 1. qkv = wqkv . rmsnorm(x) + bqkv
        copy_vector_async(norm, p.rms_att + (size_t)l * D, D);
        if (l > 0) {
            wait_for(sync - SYNC_PER_LAYER + SYNC_DOWN, gridDim.x);
            load_vector(v, p.x, D);
        }
        copy_vector_wait();
        rmsnorm_in_place(v, norm, D, p.eps);
        const float* bias = p.bqkv ? p.bqkv + (size_t)l * (q_dim + 2 * p.n_kv_heads * HD) : nullptr;
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_QKV, v,
                                [&](int row, float dot, float) { p.qkv[row] = dot + (bias ? bias[row] : 0.f); });
        publish(sync + SYNC_QKV);
        // 2. att = attention(rope(qk_norm(q)), K, V), with rope(k_norm(k)) / k_scale and v stored at row pos
        wait_for(sync + SYNC_QKV, gridDim.x);
        attention_phase<KV, HD, G>(p, l, pos, att_sh, inv_freq);
        // 3. x += wo . att
        wait_for(sync + SYNC_ATT, p.n_kv_heads);
        load_vector(v, p.att, q_dim);
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_O, v,
                                [&](int row, float dot, float) { p.x[row] = __ldcg(p.x + row) + dot; });
        publish(sync + SYNC_O);
        // 4. h = silu(gate . rmsnorm(x)) * (up . rmsnorm(x))
        copy_vector_async(norm, p.rms_ffn + (size_t)l * D, D);
        wait_for(sync + SYNC_O, gridDim.x);
        load_vector(v, p.x, D);
        copy_vector_wait();
        rmsnorm_in_place(v, norm, D, p.eps);
        stream_matrix<W, true>(p, s, l * MATS_PER_LAYER + MAT_GATE_UP, v,
                               [&](int i, float gate, float up) { p.h[i] = gate / (1.f + expf(-gate)) * up; });
        publish(sync + SYNC_GATE_UP);
        // 5. x += w_down . h
        wait_for(sync + SYNC_GATE_UP, gridDim.x);
        load_vector(v, p.h, p.hidden_dim);
        stream_matrix<W, false>(p, s, l * MATS_PER_LAYER + MAT_DOWN, v,
                                [&](int row, float dot, float) { p.x[row] = __ldcg(p.x + row) + dot; });
        publish(sync + SYNC_DOWN);
    }
    // 6. logits = lm_head . rmsnorm(x), and their argmax (-1 if any logit is NaN or inf, as argmax_gpu)
    copy_vector_async(norm, p.rms_final, D);
    wait_for(p.sync + (size_t)(L - 1) * SYNC_PER_LAYER + SYNC_DOWN, gridDim.x);
    load_vector(v, p.x, D);
    copy_vector_wait();
    rmsnorm_in_place(v, norm, D, p.eps);
    float best = -INFINITY;
    int best_index = INT_MAX;  // loses every tie with a real index
    bool nonfinite = false;
    stream_matrix<W, false>(p, s, L * MATS_PER_LAYER, v, [&](int row, float dot, float) {
        p.logits[row] = dot;
        nonfinite |= !isfinite(dot);
        if (argmax_better(dot, row, best, best_index)) { best = dot; best_index = row; }
    });
    const ArgmaxPartials partials = {decode_block_max, decode_block_argmax, decode_block_nonfinite};
    store_block_argmax(partials, best, best_index, nonfinite);
    const size_t n_sync = sync_words(L, p.n_kv_heads);
    if (arrive_last(p.sync + n_sync - 1, gridDim.x)) {  // the last block: every other one is done
        const int next = reduce_block_argmax(partials, gridDim.x);
        for (size_t i = threadIdx.x; i < n_sync; i += blockDim.x) p.sync[i] = 0;  // for the next step
        if (threadIdx.x == 0) {  // the argmax (no copies are in flight now: the fence is cheap)
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

// The stages for this shape: the shared memory left beside the work area, split evenly over the
// warps' stages. A stage must hold GROUP_ROWS rows of a 256-column stretch (else stage_bytes is 0:
// the shape does not fit).
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
                                  sizeof(AttentionShared<HD, G>)) + 15) / 16 * 16;
    const long room = (long)optin - (long)attributes.sharedSizeBytes - (long)work - (long)p->dim * 4;
    DecodeLaunch c;
    c.work_floats = (int)(work / sizeof(float));
    c.stage_bytes = room > 0 ? (int)(room / (DECODE_WARPS * WARP_STAGES) / 128 * 128) : 0;
    if (c.stage_bytes < GROUP_ROWS * (256 * (int)sizeof(W) + (is_int8<W> ? scale_slot(256) : 0))) c.stage_bytes = 0;
    c.smem = (size_t)DECODE_WARPS * WARP_STAGES * c.stage_bytes + work + (size_t)p->dim * 4;
    c.blocks = std::min(sms, MAX_DECODE_BLOCKS);
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
            CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, DECODE_THREADS, c.smem));
            if (per_sm < 1) c.stage_bytes = 0;
        }
        configured = true;
    }
    if (!launch || c.stage_bytes == 0) return c.stage_bytes;
    // cooperative: every block resident at once (they wait for each other), or the launch fails
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    cudaLaunchConfig_t config = {dim3(c.blocks), dim3(DECODE_THREADS), c.smem, stream, &attribute, 1};
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, *p, token, pos, result, c.stage_bytes, c.work_floats));
    return c.stage_bytes;
}

// The kernel exists for every weight dtype x KV dtype x head size x group cap: 120 instantiations, by
// far the longest compile of the build. So the Makefile compiles this file twice, DECODE_PART 0
// instantiating the bf16 and fp16 weights' kernels (and holding the entry points), 1 the fp32 and
// int8 ones: `make -j` builds the halves side by side.
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
#error "compile decode.cu with -DDECODE_PART=0 and 1 (Makefile)"
#endif
#define DECODE_INSTANCE(EXTERN, W) EXTERN template int dispatch_decode_w<W>(const DecodeStep*, bool, int, int, int*, cudaStream_t);
#if DECODE_PART == 0
DECODE_INSTANCE(, __nv_bfloat16)
DECODE_INSTANCE(, __half)
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

extern "C" size_t decode_sync_words(int n_layers, int n_kv_heads) { return sync_words(n_layers, n_kv_heads); }

extern "C" int decode_step_stage_bytes(const DecodeStep* step) {
    return dispatch_decode(step, false, 0, 0, nullptr, nullptr);
}

extern "C" void decode_step_gpu(const DecodeStep* step, int token, int pos, int* result, cudaStream_t stream) {
    if (dispatch_decode(step, true, token, pos, result, stream) == 0) {
        fprintf(stderr, "error: decode_step_gpu: this shape does not fit the persistent kernel (decode_step_stage_bytes)\n");
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}
#else
DECODE_INSTANCE(, float)
DECODE_INSTANCE(, int8_t)
#endif
