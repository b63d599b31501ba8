// attention.cu: decode attention of one query token over the KV cache as a chain of two kernels
// (the reference path, run.c -a 0; the persistent decode kernel in decode.cu runs the same device
// functions), and causal flash attention for a batch of prefill tokens.
//
// Decode, attention_gpu (flash-decoding; attention.cuh has the math):
//   1. attention_chunk_kernel, grid (n_chunks, n_kv_heads * n_subgroups): one work item per block;
//      blocks whose chunk starts past *pos exit at once.
//   2. attention_merge_kernel, one block per query head: merges the active chunks' partials.
// Prefill, attention_prefill_gpu: T queries at positions pos0.. against cache rows 0..pos0+t. For
// head_dim 64 and 128, attention_prefill_wgmma_kernel (Hopper, FlashAttention-3 style): blocks of
// 128 queries x tiles of 128 keys, a producer thread feeding K/V tiles through the copy engine (TMA)
// to two wgmma consumer warpgroups, online softmax in fp32; other head_dims on a plain
// one-warp-per-query kernel (the reference).
#include "attention.cuh"
#include "tensor_core.cuh"

extern "C" size_t attention_scratch_floats(int n_heads, int head_dim, int seq_len) {
    return (size_t)n_heads * attention_n_chunks(seq_len) * (head_dim + 2);  // (m, l, acc[hd]) each
}

// ---- decode: the chain's two kernels ------------------------------------------------------------

template <typename KV, int HD, int G>
__global__ void __launch_bounds__(ATT_THREADS)
attention_chunk_kernel(float* scratch, const float* q, const KV* k_cache, const KV* v_cache,
                       const int* pos, int n_heads, int n_kv_heads, int n_chunks, float scale) {
    griddep_wait();
    __shared__ AttendShared<HD, G, ATT_WARPS> sh;
    const int n_sub = (n_heads / n_kv_heads + G - 1) / G, kv_head = blockIdx.y / n_sub, chunk = blockIdx.x;
    const int len = *pos + 1;
    if (chunk * attention_chunk_rows(len, n_chunks) >= len) return;  // past the last row
    const ServedHeads heads = served_heads<G>(kv_head, blockIdx.y % n_sub, n_heads, n_kv_heads);
    for (int i = threadIdx.x; i < heads.count * HD; i += blockDim.x)
        sh.q[i / HD][i % HD] = q[(size_t)heads.h0 * HD + i] * scale;
    __syncthreads();
    attend_chunk<KV, HD, G, ATT_WARPS>(sh, [&](int h, int d, float m, float l, float acc) {
        float* partial = scratch + partial_at(h, chunk, n_chunks, HD);
        if (d == 0) { partial[0] = m; partial[1] = l; }
        partial[2 + d] = acc;
    }, k_cache, v_cache, kv_head, heads, chunk, len, n_chunks, n_kv_heads);
}

// out (n_heads, hd); one block per head
__global__ void attention_merge_kernel(float* out, const float* scratch, const int* pos, int head_dim,
                                       int n_chunks) {
    griddep_wait();
    merge_heads(ScratchPartials{scratch}, [&](int h, int d, float value) { out[(size_t)h * head_dim + d] = value; },
                blockIdx.x, 1, *pos + 1, n_chunks, head_dim);
}

template <typename KV, int HD, int G>
static void launch_attention(float* out, const float* q, const void* k_cache, const void* v_cache,
                             const int* pos, int n_heads, int n_kv_heads, int seq_len, float scale,
                             float* scratch, cudaStream_t stream) {
    const int n_chunks = attention_n_chunks(seq_len);
    const int n_sub = (n_heads / n_kv_heads + G - 1) / G;
    launch_pdl(attention_chunk_kernel<KV, HD, G>, dim3(n_chunks, n_kv_heads * n_sub), ATT_THREADS, 0, stream,
        scratch, q, (const KV*)k_cache, (const KV*)v_cache, pos, n_heads, n_kv_heads, n_chunks, scale);
    CUDA_CHECK(cudaGetLastError());
    launch_pdl(attention_merge_kernel, n_heads, ATT_THREADS, 0, stream, out, scratch, pos, HD, n_chunks);
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void attention_gpu(float* out, const float* q, const void* k_cache, const void* v_cache,
                              int kv_dtype, const int* pos, int n_heads, int n_kv_heads, int head_dim,
                              int seq_len, float scale, float* scratch, cudaStream_t stream) {
    check_attention_shape(kv_dtype, n_heads, n_kv_heads, head_dim, "attention_gpu");
    if (kv_dtype == DT_BF16) {
        DISPATCH_GROUP(n_heads / n_kv_heads, DISPATCH_HD(head_dim, (launch_attention<__nv_bfloat16, HD, G>(out, q,
                       k_cache, v_cache, pos, n_heads, n_kv_heads, seq_len, scale, scratch, stream))));
    } else {
        DISPATCH_GROUP(n_heads / n_kv_heads, DISPATCH_HD(head_dim, (launch_attention<__half, HD, G>(out, q,
                       k_cache, v_cache, pos, n_heads, n_kv_heads, seq_len, scale, scratch, stream))));
    }
}

// ---- causal flash attention on wgmma (Hopper, head_dim 64, 128) ---------------------------------

// One block = 128 queries of one head (grid: heads fastest, then query tiles, the longest first).
// Warpgroup 0 is the producer: one thread has the copy engine (TMA) load the block's Q once, then
// the K and V tiles of 128 cache rows into a ring of shared-memory stages (128-byte swizzle; rows
// past pos0 + n_tokens arrive as zeros: they may hold NaN in the cache). Warpgroups 1 and 2 are the
// consumers, 64 queries each. Per KV tile j, a consumer:
//   1. S = Q K_j^T on wgmma (m64n128k16, Q and K from shared memory), issued before the P V of tile
//      j-1 so that the tensor cores run it while ...
//   2. O += P_{j-1} V_{j-1} on wgmma (P from registers, V read N-major from shared memory)
//   3. causal mask, only on tiles that reach past a query of the warp
//   4. online softmax in fp32, log2 domain: row max, P = exp2(S scale - m), row sums
//   5. once P V of tile j-1 is done: its stage goes back to the producer, O is rescaled by the
//      change of max, and P is rounded to T as the A fragments of the next P V
// then the last P V, and O / l is stored.
constexpr int FA_BQ_WG = 64, FA_CONSUMERS = 2, FA_BQ = FA_BQ_WG * FA_CONSUMERS, FA_BKV = 128;
constexpr int FA_THREADS = 128 * (FA_CONSUMERS + 1);
constexpr int FA_COLS = 64;                     // head_dim columns per TMA box: 128 bytes, the swizzle span
constexpr int FA_Q_BOX = FA_BQ_WG * FA_COLS * 2;  // 8 KB: 64 query rows x 64 columns
constexpr int FA_KV_BOX = FA_BKV * FA_COLS * 2;   // 16 KB: 128 cache rows x 64 columns

template <int D> struct FaTile {
    static constexpr int BOXES = D / FA_COLS;                 // 64-column blocks of a row
    static constexpr int Q_BYTES = FA_CONSUMERS * BOXES * FA_Q_BOX;
    static constexpr int KV_BYTES = BOXES * FA_KV_BOX;        // one K (or V) tile
    static constexpr int STAGES = D == 128 ? 3 : 4;           // 224 or 144 KB of shared memory
    static constexpr size_t SMEM = Q_BYTES + (size_t)STAGES * 2 * KV_BYTES + 1024;  // + room to align to 1024
};

// 2^x as the bare special-function instruction (exp2f is ex2.approx without .ftz, which keeps
// subnormal results at the cost of extra instructions on the softmax's path); P below 2^-126 is 0
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

template <typename T, int D, typename O>
__global__ void __launch_bounds__(FA_THREADS, 1) attention_prefill_wgmma_kernel(
        const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
        const __grid_constant__ CUtensorMap v_map, O* out, int pos0, int n_tokens, int n_heads, int n_kv_heads,
        float scale_log2) {
    using Tile = FaTile<D>;
    extern __shared__ uint8_t fa_smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>(((uintptr_t)fa_smem_raw + 1023) & ~(uintptr_t)1023);
    __shared__ uint64_t q_full, k_full[Tile::STAGES], v_full[Tile::STAGES];  // the tile's bytes have landed
    __shared__ uint64_t empty[Tile::STAGES];  // the 8 consumer warps are done with the stage
    const int warpgroup = threadIdx.x / 128;
    const int h = blockIdx.x, kvh = h / (n_heads / n_kv_heads);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * FA_BQ;
    const int n_keys = pos0 + min(q0 + FA_BQ, n_tokens);  // cache rows any query of the block sees
    const int n_tiles = (n_keys + FA_BKV - 1) / FA_BKV;
    auto stage = [&](int j) { return smem + Tile::Q_BYTES + (j % Tile::STAGES) * 2 * Tile::KV_BYTES; };  // K, V
    if (threadIdx.x == 0) {
        mbar_init(&q_full, 1);
        for (int s = 0; s < Tile::STAGES; s++) {
            mbar_init(&k_full[s], 1);
            mbar_init(&v_full[s], 1);
            mbar_init(&empty[s], 4 * FA_CONSUMERS);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        setmaxnreg_dec<24>();
        if (threadIdx.x == 0) {
            mbar_arrive_expect_tx(&q_full, Tile::Q_BYTES);
            for (int c = 0; c < FA_CONSUMERS; c++)
                for (int b = 0; b < Tile::BOXES; b++)
                    tma_load_3d(smem + (c * Tile::BOXES + b) * FA_Q_BOX, &q_map, b * FA_COLS, h, q0 + c * FA_BQ_WG,
                                &q_full);
            for (int j = 0; j < n_tiles; j++) {
                const int s = j % Tile::STAGES;
                mbar_wait(&empty[s], ((j / Tile::STAGES) & 1) ^ 1);
                mbar_arrive_expect_tx(&k_full[s], Tile::KV_BYTES);
                for (int b = 0; b < Tile::BOXES; b++)
                    tma_load_3d(stage(j) + b * FA_KV_BOX, &k_map, b * FA_COLS, kvh, j * FA_BKV, &k_full[s]);
                mbar_arrive_expect_tx(&v_full[s], Tile::KV_BYTES);
                for (int b = 0; b < Tile::BOXES; b++)
                    tma_load_3d(stage(j) + Tile::KV_BYTES + b * FA_KV_BOX, &v_map, b * FA_COLS, kvh, j * FA_BKV,
                                &v_full[s]);
            }
        }
    } else {
        setmaxnreg_inc<240>();
        const int c = warpgroup - 1, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
        const uint8_t* sq = smem + c * Tile::BOXES * FA_Q_BOX;
        const int warp_pos = pos0 + q0 + c * FA_BQ_WG + warp * 16;  // position of the warp's first query
        const int row_pos = warp_pos + lane / 4;                     // this thread's rows: row_pos, row_pos + 8
        // s[4i + e]: S of row row_pos + 8 (e / 2), key 8i + 2 (lane % 4) + e % 2 of the tile (wgmma's
        // accumulator layout); o likewise over head_dim
        float s[FA_BKV / 2], o[D / 2];
        uint32_t p[FA_BKV / 16][4];  // P as the A fragments of O += P V, one per 16 keys
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, corr[2];
#pragma unroll
        for (int i = 0; i < D / 2; i++) o[i] = 0.f;
        auto fence_all = [&]() {
#pragma unroll
            for (int i = 0; i < FA_BKV / 2; i++) fence_operand(s[i]);
#pragma unroll
            for (int i = 0; i < D / 2; i++) fence_operand(o[i]);
#pragma unroll
            for (int kk = 0; kk < FA_BKV / 16; kk++)
#pragma unroll
                for (int i = 0; i < 4; i++) fence_operand(p[kk][i]);
        };
        auto issue_qk = [&](int j) {
            const uint8_t* ks = stage(j);
#pragma unroll
            for (int b = 0; b < Tile::BOXES; b++)
#pragma unroll
                for (int kk = 0; kk < FA_COLS / 16; kk++)  // k16 step = 32 bytes further into each 128-byte row
                    wgmma_m64n128k16<T>(s, wgmma_desc(sq + b * FA_Q_BOX) + 2 * kk,
                                             wgmma_desc(ks + b * FA_KV_BOX) + 2 * kk, b + kk > 0);
        };
        auto issue_pv = [&](int j) {
            const uint64_t desc = wgmma_desc_n_major(stage(j) + Tile::KV_BYTES, FA_KV_BOX);
#pragma unroll
            for (int kk = 0; kk < FA_BKV / 16; kk++)  // k16 step = 16 rows of V = 2048 bytes
                wgmma_m64k16_rs_n_major<T, D>(o, p[kk], desc + kk * (2048 >> 4));
        };
        auto softmax = [&](int j) {  // S -> exp2(S scale - m) in place; m, l updated, corr = exp2(m_old - m)
            if (j * FA_BKV + FA_BKV - 1 > warp_pos) {  // the tile reaches past some query of the warp
#pragma unroll
                for (int i = 0; i < FA_BKV / 8; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (j * FA_BKV + i * 8 + (lane % 4) * 2 + e % 2 > row_pos + (e / 2) * 8) s[4 * i + e] = -INFINITY;
            }
            // every row sees key 0 in tile 0, so m is finite from then on
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int i = 0; i < FA_BKV / 8; i++) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m[r], mx * scale_log2);
                corr[r] = exp2_ftz(m[r] - m_new);
                m[r] = m_new;
                float sum = 0.f;  // this thread's part of the row; the quad is summed once at the end
#pragma unroll
                for (int i = 0; i < FA_BKV / 8; i++)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; e++) {
                        s[4 * i + e] = exp2_ftz(fmaf(s[4 * i + e], scale_log2, -m_new));
                        sum += s[4 * i + e];
                    }
                l[r] = l[r] * corr[r] + sum;
            }
        };
        auto rescale_and_pack = [&]() {  // O *= corr; P -> A fragments (keys 16kk + 2 (lane % 4) .., + 8 ..)
#pragma unroll
            for (int i = 0; i < D / 2; i++) o[i] *= corr[(i / 2) % 2];
#pragma unroll
            for (int kk = 0; kk < FA_BKV / 16; kk++)
#pragma unroll
                for (int i = 0; i < 4; i++) p[kk][i] = pack2<T>(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
        };

        mbar_wait(&q_full, 0);
        mbar_wait(&k_full[0], 0);
        wgmma_fence();
        issue_qk(0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_all();
        softmax(0);
        rescale_and_pack();
        for (int j = 1; j < n_tiles; j++) {
            mbar_wait(&v_full[(j - 1) % Tile::STAGES], ((j - 1) / Tile::STAGES) & 1);  // loaded before K_j
            mbar_wait(&k_full[j % Tile::STAGES], (j / Tile::STAGES) & 1);
            fence_all();
            wgmma_fence();
            issue_qk(j);
            wgmma_commit();
            issue_pv(j - 1);
            wgmma_commit();
            wgmma_wait<1>();  // S of tile j is done
            fence_all();
            softmax(j);
            wgmma_wait<0>();  // P V of tile j - 1 is done: its stage is free, P and O may change
            fence_all();
            if (lane == 0) mbar_arrive(&empty[(j - 1) % Tile::STAGES]);
            rescale_and_pack();
        }
        // the last P V (its stage is not handed back: the producer has no more tiles to load)
        mbar_wait(&v_full[(n_tiles - 1) % Tile::STAGES], ((n_tiles - 1) / Tile::STAGES) & 1);
        fence_all();
        wgmma_fence();
        issue_pv(n_tiles - 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_all();

        const size_t out_stride = (size_t)n_heads * D;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = l[r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = 1.f / sum;
            const int t = q0 + c * FA_BQ_WG + warp * 16 + lane / 4 + r * 8;
            if (t >= n_tokens) continue;
            O* dst = out + (size_t)t * out_stride + (size_t)h * D + (lane % 4) * 2;
#pragma unroll
            for (int i = 0; i < D / 8; i++) store2(dst + i * 8, o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
        }
    }
}

// ---- any even head_dim <= 256: CUDA cores --------------------------------------------------------

// One warp per (query, head), keys one at a time: lane owns dims lane + 32 i; the same function as the
// tensor-core kernel (q, K and V in the cache type, fp32 arithmetic).
constexpr int FA_SIMPLE_WARPS = 4, FA_SIMPLE_MAX_DIMS = 8;  // 8 * 32 = head_dim 256

template <typename KV, typename O>
__global__ void attention_prefill_simple_kernel(O* out, const KV* q_rows, const KV* k_cache, const KV* v_cache,
                                                int pos0, int n_tokens, int n_heads, int n_kv_heads, int head_dim,
                                                float scale) {
    const int job = blockIdx.x * FA_SIMPLE_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (job >= n_tokens * n_heads) return;
    const int t = job / n_heads, h = job % n_heads, kvh = h / (n_heads / n_kv_heads);
    const KV* q = q_rows + ((size_t)t * n_heads + h) * head_dim;
    float qv[FA_SIMPLE_MAX_DIMS], acc[FA_SIMPLE_MAX_DIMS];
#pragma unroll
    for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? to_float(q[d]) : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int key = 0; key <= pos0 + t; key++) {
        const size_t row = ((size_t)key * n_kv_heads + kvh) * head_dim;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) dot = fmaf(qv[i], to_float(k_cache[row + d]), dot);
        }
        const float s = warp_sum(dot) * scale, m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = fmaf(p, to_float(v_cache[row + d]), acc[i] * corr);
        }
        m = m_new;
    }
    O* dst = out + (size_t)t * n_heads * head_dim + (size_t)h * head_dim;
#pragma unroll
    for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) dst[d] = from_float<O>(acc[i] / l);
    }
}

// The map of a (rows, heads, head_dim) array of T (q rows, or a KV cache), read in boxes of 64
// columns x 1 head x box_rows rows in the 128-byte swizzle; rows past `rows` arrive as zeros.
template <typename T>
static CUtensorMap head_rows_map(const void* base, int rows, int heads, int head_dim, int box_rows) {
    return tensor_map<T, 3>("attention_prefill_gpu", base, {(cuuint64_t)head_dim, (cuuint64_t)heads, (cuuint64_t)rows},
                            {(cuuint64_t)head_dim * sizeof(T), (cuuint64_t)heads * head_dim * sizeof(T)},
                            {FA_COLS, 1, (cuuint32_t)box_rows});
}

template <typename T, int D, typename O>
static void launch_attention_wgmma(O* out, const void* q, const void* k_cache, const void* v_cache, int pos0,
                                   int n_tokens, int n_heads, int n_kv_heads, float scale, cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    auto kernel = attention_prefill_wgmma_kernel<T, D, O>;
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)FaTile<D>::SMEM));
        configured = true;
    }
    const int n_rows = pos0 + n_tokens;  // cache rows past these may hold anything: the maps end here
    const dim3 grid(n_heads, (n_tokens + FA_BQ - 1) / FA_BQ);
    kernel<<<grid, FA_THREADS, FaTile<D>::SMEM, stream>>>(
        head_rows_map<T>(q, n_tokens, n_heads, D, FA_BQ_WG), head_rows_map<T>(k_cache, n_rows, n_kv_heads, D, FA_BKV),
        head_rows_map<T>(v_cache, n_rows, n_kv_heads, D, FA_BKV), out, pos0, n_tokens, n_heads, n_kv_heads,
        scale * 1.4426950408889634f);  // exp(x) = exp2(x log2 e)
}

template <typename T, typename O>
static void launch_attention(O* out, const void* q, const void* k_cache, const void* v_cache, int pos0,
                             int n_tokens, int n_heads, int n_kv_heads, int head_dim, float scale,
                             cudaStream_t stream) {
    const bool aligned = aligned16(q) && aligned16(k_cache) && aligned16(v_cache);
    if (aligned && head_dim == 64) {
        launch_attention_wgmma<T, 64, O>(out, q, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else if (aligned && head_dim == 128) {
        launch_attention_wgmma<T, 128, O>(out, q, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else {
        const int jobs = n_tokens * n_heads;
        attention_prefill_simple_kernel<T, O><<<(jobs + FA_SIMPLE_WARPS - 1) / FA_SIMPLE_WARPS, FA_SIMPLE_WARPS * 32, 0,
                                             stream>>>(out, (const T*)q, (const T*)k_cache, (const T*)v_cache, pos0,
                                                       n_tokens, n_heads, n_kv_heads, head_dim, scale);
    }
}

extern "C" void attention_prefill_gpu(void* out, int out_dtype, const void* q, const void* k_cache, const void* v_cache,
                                      int kv_dtype, int pos0, int n_tokens, int n_heads, int n_kv_heads,
                                      int head_dim, float scale, cudaStream_t stream) {
    if (head_dim < 2 || head_dim % 2 || head_dim > 32 * FA_SIMPLE_MAX_DIMS || n_kv_heads < 1 ||
        n_heads % n_kv_heads || n_tokens < 1 || pos0 < 0) {
        fprintf(stderr, "error: attention_prefill_gpu: unsupported shape (head_dim %d, heads %d:%d, %d tokens at %d)\n",
                head_dim, n_heads, n_kv_heads, n_tokens, pos0);
        exit(1);
    }
    if (kv_dtype != DT_BF16 && kv_dtype != DT_F16) {
        fprintf(stderr, "error: attention_prefill_gpu: KV cache dtype %d is not bf16 or fp16\n", kv_dtype);
        exit(1);
    }
    DISPATCH_ACT(out_dtype, "attention_prefill_gpu", {
        if (kv_dtype == DT_BF16)
            launch_attention<__nv_bfloat16>((A*)out, q, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads,
                                            head_dim, scale, stream);
        else
            launch_attention<__half>((A*)out, q, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, head_dim,
                                     scale, stream);
    });
    CUDA_CHECK(cudaGetLastError());
}
