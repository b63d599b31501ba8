// matmul.cu: the prefill matrix products, out (T, rows) (+)= x (T, cols) . w (rows, cols)^T + bias,
// on the tensor cores (wgmma, sm_90a, fp32 accumulation); the LM head fused with the cross entropy
// (perplexity without storing the logits); and the batched SwiGLU gate. Both operands are k-major
// (x rows and w rows are contiguous in k), the layout wgmma reads without a transpose; x is already
// in the tensor cores' type (kernels.h, matmul_input_dtype).
//
// Two kernels compute the product, both in block tiles of 128 tokens x 128 or 256 weight rows:
//   matmul_tma_kernel, the fast path (bf16, fp16 weights): one block per SM walks over tiles; one
//     producer thread has the copy engine (TMA) fill a ring of shared-memory stages, two consumer
//     warpgroups run wgmma on them, and each stage goes back to the producer as soon as its wgmmas
//     are done.
//   matmul_simple_kernel, the reference, and the path of int8 weights (dequantized in registers):
//     every thread loads (cp.async), one block barrier per k step.
// Each warpgroup of either ends with 64 tokens x 128 weight rows per sub-tile in wgmma's accumulator
// layout and hands them to one epilogue: StoreOut (out = acc + bias, or out += ...) or LossPartials
// (the LM head's per-row softmax partials).
#include "tensor_core.cuh"

// ---- epilogues --------------------------------------------------------------------------------------

// acc[4j + 2h + e] of lane `lane` in warp w of the warpgroup is token t0 + 16 w + lane/4 + 8h, weight
// row r0 + 8j + 2 (lane % 4) + e (rows % 8 == 0 keeps a pair inside or outside the matrix).
struct StoreOut {
    static constexpr bool paired = false;  // one sub-tile at a time
    float* out;          // (n_tokens, rows)
    const float* bias;   // (rows) or NULL
    int accumulate;      // out += instead of out =
    __device__ __forceinline__ void operator()(const float (&acc)[64], int t0, int r0, int n_tokens, int rows) const {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int r = r0 + j * 8 + (lane % 4) * 2;
            if (r >= rows) continue;
            const float2 b = bias ? make_float2(bias[r], bias[r + 1]) : make_float2(0.f, 0.f);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int t = t0 + warp * 16 + lane / 4 + h * 8;
                if (t >= n_tokens) continue;
                float2* o = reinterpret_cast<float2*>(out + (size_t)t * rows + r);
                float2 v = make_float2(acc[4 * j + 2 * h] + b.x, acc[4 * j + 2 * h + 1] + b.y);
                if (accumulate) { const float2 prev = *o; v.x += prev.x; v.y += prev.y; }
                *o = v;
            }
        }
    }
};

// The LM head for perplexity: per token row and 128-row tile of the vocabulary, the max m of the
// tile's logits and the sum of exp(logit - m) (both NaN if a logit is NaN or +inf), and the target's
// logit where the target falls in the tile; lm_head_loss_merge_kernel then merges the tiles.
constexpr int LOSS_TILE = 128;
struct LossPartials {
    static constexpr bool paired = false;
    float2* partials;     // (n_tokens, n_tiles) of (m, sum)
    float* target_logit;  // (n_tokens)
    const int* targets;   // (n_tokens)
    int n_tiles;          // ceil(vocab / LOSS_TILE)
    __device__ __forceinline__ void operator()(const float (&acc)[64], int t0, int r0, int n_tokens, int rows) const {
        if (r0 >= rows) return;  // a sub-tile wholly past the vocabulary (same for the whole warpgroup)
        // acc[4j + i] is token t[i / 2], weight row r0 + 8j + 2 (lane % 4) + i % 2
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4;
        int t[2], target[2];
        float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};
        int bad[2] = {0, 0};
#pragma unroll
        for (int h = 0; h < 2; h++) {
            t[h] = t0 + warp * 16 + lane / 4 + h * 8;
            target[h] = t[h] < n_tokens ? targets[t[h]] : -1;
        }
#pragma unroll
        for (int j = 0; j < 16; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int h = i / 2, r = r0 + j * 8 + (lane % 4) * 2 + i % 2;
                const float v = acc[4 * j + i];
                if (r >= rows) continue;
                m[h] = fmaxf(m[h], v);
                bad[h] |= !(v < INFINITY);  // NaN or +inf
                if (r == target[h]) target_logit[t[h]] = v;
            }
#pragma unroll
        for (int h = 0; h < 2; h++) {  // the 4 lanes of a quad hold the row's 128 logits
            m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
            m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 2));
        }
#pragma unroll
        for (int j = 0; j < 16; j++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (r0 + j * 8 + (lane % 4) * 2 + i % 2 < rows) sum[i / 2] += expf(acc[4 * j + i] - m[i / 2]);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 1);
            sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], 2);
            bad[h] |= __shfl_xor_sync(0xffffffffu, bad[h], 1);
            bad[h] |= __shfl_xor_sync(0xffffffffu, bad[h], 2);
            if (lane % 4 == 0 && t[h] < n_tokens)
                partials[(size_t)t[h] * n_tiles + r0 / LOSS_TILE] = bad[h] ? make_float2(NAN, NAN)
                                                                           : make_float2(m[h], sum[h]);
        }
    }
};

// silu(gate) * up, in fp32: the fused epilogue and the SwiGLU kernel compute the same function
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.f + expf(-gate)) * up; }

// The MLP's gate and up products with SwiGLU in the epilogue: h = silu(gate) * up, stored in the type
// the down product reads (O), the gate_up product never in memory. A paired tile holds 128 gate rows
// and the up rows of the same hidden units, so gate[i] and up[i] are the same unit and token.
template <typename O> struct SwiGLUOut {
    static constexpr bool paired = true;
    O* h;  // (n_tokens, hidden)
    __device__ __forceinline__ void operator()(const float (&gate)[64], const float (&up)[64], int t0, int u0,
                                               int n_tokens, int hidden) const {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int u = u0 + j * 8 + (lane % 4) * 2;
            if (u >= hidden) continue;
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int t = t0 + warp * 16 + lane / 4 + r * 8;
                if (t >= n_tokens) continue;
                const int i = 4 * j + 2 * r;
                store2(h + (size_t)t * hidden + u, silu_mul(gate[i], up[i]), silu_mul(gate[i + 1], up[i + 1]));
            }
        }
    }
};

// The attention's inputs from the qkv product (head_dim HD = 64 or 128): each 128-row sub-tile holds
// 128 / HD whole heads (q heads, then k, then v, by row), and the 4 lanes of a quad hold a token's whole
// head, so its RMS is a quad reduction and RoPE's pairs (i, i + HD/2) are in the same lane (acc[4j + ..]
// and acc[4(j + HD/16) + ..]). The function of qk_norm_rope_batch_gpu (rope.cu), in its order: + bias,
// x * rsqrt(mean(x^2) + eps) * norm, the rotation (its cos and sin from rope_table_gpu's table); q to
// q_out, k / k_scale and v to the caches, all in KV.
template <typename KV, int HD> struct QKVRopeOut {
    static constexpr bool paired = false;
    KV* q_out;                       // (n_tokens, n_heads * HD)
    KV *k_cache, *v_cache;           // (seq_len, n_kv_heads, HD), rows pos0 + t
    const float *bias;               // (qkv rows) or NULL
    const float *q_norm, *k_norm;    // (HD) each, or NULL (Qwen2)
    const float4* rope;              // (n_tokens, HD / 4): (cos, sin) of pairs i, i + 1 (rope_table_gpu)
    float k_scale, eps;
    int pos0, n_heads, n_kv_heads;
    __device__ __forceinline__ void operator()(const float (&acc)[64], int t0, int r0, int n_tokens, int rows) const {
        constexpr int J = HD / 8;  // column groups of 8 per head: acc[4 (J hh + j) + 2 h + e]
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32 % 4, col = (lane % 4) * 2;
#pragma unroll
        for (int hh = 0; hh < 128 / HD; hh++) {
            const int head = r0 / HD + hh;  // the same for the whole warpgroup
            if (head * HD >= rows) break;
            const bool is_q = head < n_heads, is_v = head >= n_heads + n_kv_heads;
            const float* norm = is_q ? q_norm : is_v ? nullptr : k_norm;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int t = t0 + warp * 16 + lane / 4 + h * 8;  // the same for the 4 lanes of a quad
                float x[J][2];
#pragma unroll
                for (int j = 0; j < J; j++)
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        x[j][e] = acc[4 * (J * hh + j) + 2 * h + e] + (bias ? bias[head * HD + 8 * j + col + e] : 0.f);
                if (norm) {  // every lane of the warp takes part in the quad's reduction
                    float ss = 0.f;
#pragma unroll
                    for (int j = 0; j < J; j++) ss = fmaf(x[j][0], x[j][0], fmaf(x[j][1], x[j][1], ss));
                    ss += __shfl_xor_sync(0xffffffffu, ss, 1);
                    ss += __shfl_xor_sync(0xffffffffu, ss, 2);
                    const float inv_rms = rsqrtf(ss / HD + eps);
#pragma unroll
                    for (int j = 0; j < J; j++)
#pragma unroll
                        for (int e = 0; e < 2; e++) x[j][e] = x[j][e] * inv_rms * norm[8 * j + col + e];
                }
                if (t >= n_tokens) continue;
                const int kv_head = is_q ? 0 : (head - n_heads) % n_kv_heads;  // k heads, then v heads
                const size_t cache_row = ((size_t)(pos0 + t) * n_kv_heads + kv_head) * HD;
                if (is_v) {
#pragma unroll
                    for (int j = 0; j < J; j++) store2(v_cache + cache_row + 8 * j + col, x[j][0], x[j][1]);
                    continue;
                }
                KV* dst = is_q ? q_out + ((size_t)t * n_heads + head) * HD : k_cache + cache_row;
                const float scale = is_q ? 1.f : k_scale;
#pragma unroll
                for (int j = 0; j < J / 2; j++) {
                    const float4 cs = rope[((size_t)t * HD / 2 + 8 * j + col) / 2];  // pairs 8j + col, + 1
                    const float c[2] = {cs.x, cs.z}, s[2] = {cs.y, cs.w};
                    float rot[2][2];  // [first / second half][e]
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const float a = x[j][e], b = x[j + J / 2][e];
                        rot[0][e] = (a * c[e] - b * s[e]) / scale;
                        rot[1][e] = (b * c[e] + a * s[e]) / scale;
                    }
                    store2(dst + 8 * j + col, rot[0][0], rot[0][1]);
                    store2(dst + HD / 2 + 8 * j + col, rot[1][0], rot[1][1]);
                }
            }
        }
    }
};

// ---- the fast path: TMA producer, two wgmma consumer warpgroups -----------------------------------

// Tile 128 tokens x BN weight rows x 64 k per stage: a 16 KB x tile and a BN x 128-byte w tile, each
// in the 128-byte swizzle that wgmma_desc reads (the copy engine writes it). Consumer warpgroup c
// computes tokens 64c..64c+63 x all BN rows, as BN / 128 wgmma m64n128k16 per k16 step. BN = 256
// halves the x reads per flop; 128 gives twice the tiles, for products too small to fill the GPU.
constexpr int TMA_BM = 128, TMA_BK = 64, TMA_THREADS = 384;  // warpgroup 0 produces, 1 and 2 consume
template <int BN> struct TmaTile {
    static constexpr int STAGES = BN == 256 ? 4 : 6;  // 192 KB of stages either way
    static constexpr int X_BYTES = TMA_BM * TMA_BK * 2, STAGE_BYTES = X_BYTES + BN * TMA_BK * 2;
    static constexpr size_t SMEM = (size_t)STAGES * STAGE_BYTES + 1024;  // + room to align to 1024
};

// the accumulators stay where the asynchronous wgmmas write them (no copies the compiler would make
// between their issue and their wait, which serialize the wgmmas)
template <int N> __device__ __forceinline__ void fence_accumulators(float (&acc)[N][64]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int i = 0; i < 64; i++) fence_operand(acc[n][i]);
}

template <typename T, int BN, typename Epilogue>
__global__ void __launch_bounds__(TMA_THREADS, 1) matmul_tma_kernel(const __grid_constant__ CUtensorMap x_map,
                                                                    const __grid_constant__ CUtensorMap w_map,
                                                                    Epilogue epilogue, int n_tokens, int rows,
                                                                    int cols) {
    using Tile = TmaTile<BN>;
    extern __shared__ uint8_t tma_smem_raw[];
    uint8_t* smem = reinterpret_cast<uint8_t*>(((uintptr_t)tma_smem_raw + 1023) & ~(uintptr_t)1023);
    __shared__ uint64_t full[Tile::STAGES];   // the stage's bytes have landed
    __shared__ uint64_t empty[Tile::STAGES];  // the 8 consumer warps are done with the stage
    const int warpgroup = threadIdx.x / 128;
    const int k_tiles = (cols + TMA_BK - 1) / TMA_BK, m_tiles = (n_tokens + TMA_BM - 1) / TMA_BM;
    // tile i: tokens (i % m_tiles), weight rows (i / m_tiles): BN of them from w_row(i / m_tiles), in
    // boxes of 128; a paired epilogue's tile: 128 gate rows and the 128 up rows rows / 2 further
    constexpr bool PAIRED = Epilogue::paired;
    static_assert(!PAIRED || BN == 256, "a paired tile is 128 gate rows and 128 up rows");
    const int n_tiles = m_tiles * (PAIRED ? (rows / 2 + 127) / 128 : (rows + BN - 1) / BN);
    auto box_row = [&](int tile, int box) {  // the first weight row of the tile's box 0 or 1
        const int nt = tile / m_tiles;
        return PAIRED ? nt * 128 + box * (rows / 2) : nt * BN + box * 128;
    };
    if (threadIdx.x == 0) {
        for (int s = 0; s < Tile::STAGES; s++) {
            mbar_init(&full[s], 1);
            mbar_init(&empty[s], 8);
        }
        mbar_init_fence();
    }
    __syncthreads();

    // Persistent: block b computes tiles b, b + gridDim.x, ...; `it` counts the block's k steps over
    // all its tiles, so k step `it` uses stage it % STAGES. The producer runs ahead into the next
    // tile while the consumers store the last one.
    if (warpgroup == 0) {
        // producer: each k step's two tiles into its stage once the consumers have freed it (rows and
        // k past the matrices arrive as zeros)
        setmaxnreg_dec<40>();
        if (threadIdx.x == 0) {
            int it = 0;
            for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
                const int m0 = tile % m_tiles * TMA_BM;
                for (int kt = 0; kt < k_tiles; kt++, it++) {
                    const int s = it % Tile::STAGES;
                    mbar_wait(&empty[s], ((it / Tile::STAGES) & 1) ^ 1);
                    uint8_t* stage = smem + s * Tile::STAGE_BYTES;
                    mbar_arrive_expect_tx(&full[s], Tile::STAGE_BYTES);
                    tma_load_2d(stage, &x_map, kt * TMA_BK, m0, &full[s]);
                    for (int box = 0; box < BN / 128; box++)
                        tma_load_2d(stage + Tile::X_BYTES + box * 128 * 128, &w_map, kt * TMA_BK, box_row(tile, box),
                                    &full[s]);
                }
            }
        }
    } else {
        // consumers: the wgmmas of k step `it` run while the stage of it - 1 goes back to the producer
        setmaxnreg_inc<232>();
        const int c = warpgroup - 1;
        const bool signals = threadIdx.x % 32 == 0;  // one arrival per warp on `empty`
        int it = 0;
        for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
            float acc[BN / 128][64];
#pragma unroll
            for (int n = 0; n < BN / 128; n++)
#pragma unroll
                for (int i = 0; i < 64; i++) acc[n][i] = 0.f;
            for (int kt = 0; kt < k_tiles; kt++, it++) {
                const int s = it % Tile::STAGES;
                mbar_wait(&full[s], (it / Tile::STAGES) & 1);
                const uint8_t* xs = smem + s * Tile::STAGE_BYTES + c * 64 * 128;  // this warpgroup's 64 tokens
                const uint8_t* ws = smem + s * Tile::STAGE_BYTES + Tile::X_BYTES;
                fence_accumulators(acc);
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < TMA_BK / 16; ks++)  // k16 step = 32 bytes further into each 128-byte row
#pragma unroll
                    for (int n = 0; n < BN / 128; n++)
                        wgmma_m64n128k16<T>(acc[n], wgmma_desc(xs) + 2 * ks, wgmma_desc(ws + n * 128 * 128) + 2 * ks);
                wgmma_commit();
                wgmma_wait<1>();  // k step it - 1's wgmmas are done
                fence_accumulators(acc);
                if (kt > 0 && signals) mbar_arrive(&empty[(it - 1) % Tile::STAGES]);
            }
            wgmma_wait<0>();
            fence_accumulators(acc);
            if (signals) mbar_arrive(&empty[(it - 1) % Tile::STAGES]);
            const int t0 = tile % m_tiles * TMA_BM + c * 64;
            if constexpr (PAIRED) {
                epilogue(acc[0], acc[1], t0, box_row(tile, 0), n_tokens, rows / 2);
            } else {
#pragma unroll
                for (int n = 0; n < BN / 128; n++) epilogue(acc[n], t0, box_row(tile, n), n_tokens, rows);
            }
        }
    }
}

static int multiprocessors() {
    static int n_sm = 0;
    if (!n_sm) {
        int device;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device));
    }
    return n_sm;
}

// The map of a (rows, cols) k-major matrix of T, read in boxes of 64 k x box_rows rows (128 bytes
// of k per row: the 128-byte swizzle); boxes reaching past the matrix are filled with zeros.
template <typename T> static CUtensorMap tile_map(const void* base, int rows, int cols, int box_rows) {
    return tensor_map<T, 2>("matmul_gpu", base, {(cuuint64_t)cols, (cuuint64_t)rows}, {(cuuint64_t)cols * sizeof(T)},
                            {TMA_BK, (cuuint32_t)box_rows});
}

template <typename T, int BN, typename Epilogue>
static void launch_tma(Epilogue epilogue, const void* w, const void* x, int n_tokens, int rows, int cols,
                       cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    auto kernel = matmul_tma_kernel<T, BN, Epilogue>;
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)TmaTile<BN>::SMEM));
        configured = true;
    }
    const long tiles = (long)((n_tokens + TMA_BM - 1) / TMA_BM) * ((rows + BN - 1) / BN);
    const int grid = (int)(tiles < multiprocessors() ? tiles : multiprocessors());
    kernel<<<grid, TMA_THREADS, TmaTile<BN>::SMEM, stream>>>(tile_map<T>(x, n_tokens, cols, TMA_BM),
                                                             tile_map<T>(w, rows, cols, 128), epilogue, n_tokens,
                                                             rows, cols);
}

// 256-row tiles unless they leave SMs idle that 128-row tiles would fill: waves of tiles, a
// 128-row tile counted at 0.6 of a 256-row one (it reads x once per 128 rows, not per 256)
template <typename T, typename Epilogue>
static void launch_tma(Epilogue epilogue, const void* w, const void* x, int n_tokens, int rows, int cols,
                       cudaStream_t stream) {
    const int n_sm = multiprocessors();
    const long m_tiles = (n_tokens + TMA_BM - 1) / TMA_BM;
    const long waves_256 = (m_tiles * ((rows + 255) / 256) + n_sm - 1) / n_sm;
    const long waves_128 = (m_tiles * ((rows + 127) / 128) + n_sm - 1) / n_sm;
    if (10 * waves_256 <= 6 * waves_128)
        launch_tma<T, 256>(epilogue, w, x, n_tokens, rows, cols, stream);
    else
        launch_tma<T, 128>(epilogue, w, x, n_tokens, rows, cols, stream);
}

// ---- the reference: every thread loads, one barrier per k step -------------------------------------

// Block tile 128 tokens x 128 weight rows x 64 k, two warpgroups (256 threads), warpgroup g
// computing tokens 64g..64g+63 x all 128 rows with wgmma m64n128k16 (64 fp32 accumulators per
// thread). 3 shared-memory stages: the tiles of k step kt+2 stream in with cp.async while the
// wgmmas of kt run. int8 weights are loaded to registers with their scales instead, dequantized
// (exact in fp32) and rounded to bf16 on their way into shared memory one step later.
constexpr int MM_BM = 128, MM_BN = 128, MM_BK = 64, MM_STAGES = 3, MM_THREADS = 256;
constexpr int MM_CHUNKS = MM_BK / 8;                                         // 16-byte chunks per tile row
constexpr int MM_STAGE_CHUNKS = (MM_BM + MM_BN) * MM_CHUNKS;                 // x tile then w tile, 32 KB
constexpr int MM_LOADS = MM_BM * MM_CHUNKS / MM_THREADS;                     // chunks per thread per tile (4)
constexpr size_t MM_SMEM = (size_t)MM_STAGES * MM_STAGE_CHUNKS * 16 + 1024;  // + room to align to 1024

// x (n_tokens, cols) of T; w (rows, cols) of W (T itself, or int8 with scales (rows, cols / Q8_BLOCK)).
// Grid (token tiles, row tiles): consecutive blocks share a weight tile, so the LM head's weights
// stream from DRAM once. cols % 8 == 0: a chunk of 8 k is entirely inside or outside the matrix
// (int8: inside one block of scale).
template <typename T, typename W, typename Epilogue>
__global__ void __launch_bounds__(MM_THREADS) matmul_simple_kernel(Epilogue epilogue, const W* w, const __half* scales,
                                                                   const T* x, int n_tokens, int rows, int cols) {
    extern __shared__ uint8_t mm_smem_raw[];
    uint4* smem = reinterpret_cast<uint4*>(((uintptr_t)mm_smem_raw + 1023) & ~(uintptr_t)1023);  // swizzle atom
    const int tid = threadIdx.x, wg = tid / 128;
    const int m0 = blockIdx.x * MM_BM, n0 = blockIdx.y * MM_BN;
    const int k_tiles = (cols + MM_BK - 1) / MM_BK;

    auto load_x = [&](int kt, int stage) {
        uint4* sx = smem + stage * MM_STAGE_CHUNKS;
#pragma unroll
        for (int i = 0; i < MM_LOADS; i++) {
            const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
            const int t = m0 + r, k = kt * MM_BK + ch * 8;
            const bool valid = t < n_tokens && k < cols;
            cp_async16(&sx[swizzle(r, ch, MM_CHUNKS)], valid ? x + (size_t)t * cols + k : x, valid);
        }
    };
    uint2 w_next[MM_LOADS];  // int8: the next weight tile, 8 values per chunk, and their scales
    float w_scale[MM_LOADS];
    auto load_w = [&](int kt, int stage) {  // 16-bit: cp.async straight into the stage; int8: to registers
        uint4* sw = smem + stage * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
#pragma unroll
        for (int i = 0; i < MM_LOADS; i++) {
            const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
            const int n = n0 + r, k = kt * MM_BK + ch * 8;
            const bool valid = n < rows && k < cols;
            if constexpr (is_int8<W>) {
                const size_t at = (size_t)n * cols + k;
                w_next[i] = valid ? __ldg(reinterpret_cast<const uint2*>(w + at)) : make_uint2(0, 0);
                w_scale[i] = valid ? __half2float(__ldg(scales + at / Q8_BLOCK)) : 0.f;
            } else {
                cp_async16(&sw[swizzle(r, ch, MM_CHUNKS)], valid ? w + (size_t)n * cols + k : w, valid);
            }
        }
    };
    auto store_w = [&](int stage) {  // int8: the registers, dequantized and rounded to bf16
        if constexpr (is_int8<W>) {
            uint4* sw = smem + stage * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
#pragma unroll
            for (int i = 0; i < MM_LOADS; i++) {
                const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
                float f[8];
                int8x4_to_float(w_next[i].x, f);
                int8x4_to_float(w_next[i].y, f + 4);
                const float s = w_scale[i];
                sw[swizzle(r, ch, MM_CHUNKS)] = pack8<T>(make_float4(f[0] * s, f[1] * s, f[2] * s, f[3] * s),
                                                         make_float4(f[4] * s, f[5] * s, f[6] * s, f[7] * s));
            }
        }
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.f;
    // prologue: tiles 0 and 1 in flight (one commit group per k tile, empty ones included, so that
    // "all but the newest group done" always means "tile kt has landed"); int8 w of tile 0 stored,
    // of tile 1 in registers
    load_x(0, 0);
    load_w(0, 0);
    store_w(0);
    cp_async_commit();
    if (1 < k_tiles) {
        load_x(1, 1);
        load_w(1, 1);
    }
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; kt++) {
        cp_async_wait<1>();
        fence_proxy_async();  // this thread's st.shared / cp.async writes, visible to wgmma
        __syncthreads();      // ... of every thread; and stage (kt-1) % 3 is free (its wgmmas waited)
        const uint4* sx = smem + (kt % MM_STAGES) * MM_STAGE_CHUNKS + wg * 64 * MM_CHUNKS;
        const uint4* sw = smem + (kt % MM_STAGES) * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < MM_BK / 16; ks++)  // k16 step = 32 bytes further into each 128-byte row
            wgmma_m64n128k16<T>(acc, wgmma_desc(sx) + 2 * ks, wgmma_desc(sw) + 2 * ks);
        wgmma_commit();
        // while the tensor cores run: int8 w of tile kt+1 into its stage, loads of tile kt+2 issued
        if (kt + 1 < k_tiles) store_w((kt + 1) % MM_STAGES);
        if (kt + 2 < k_tiles) {
            load_x(kt + 2, (kt + 2) % MM_STAGES);
            load_w(kt + 2, (kt + 2) % MM_STAGES);
        }
        cp_async_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 64; i++) fence_operand(acc[i]);
    }
    epilogue(acc, m0 + wg * 64, n0, n_tokens, rows);
}

template <typename T, typename W, typename Epilogue>
static void launch_simple(Epilogue epilogue, const void* w, const void* scales, const void* x, int n_tokens, int rows,
                          int cols, cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    auto kernel = matmul_simple_kernel<T, W, Epilogue>;
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)MM_SMEM));
        configured = true;
    }
    const dim3 grid((n_tokens + MM_BM - 1) / MM_BM, (rows + MM_BN - 1) / MM_BN);
    kernel<<<grid, MM_THREADS, MM_SMEM, stream>>>(epilogue, (const W*)w, (const __half*)scales, (const T*)x, n_tokens,
                                                  rows, cols);
}

// fp32 weights: a plain shared-memory tiled product on the CUDA cores (correct, not tuned).
// Block (16, 16): threadIdx.x walks weight rows, threadIdx.y tokens.
constexpr int MM_F32_TILE = 16;
__global__ void matmul_f32_kernel(float* out, const float* w, const float* x, const float* bias,
                                  int n_tokens, int rows, int cols, int accumulate) {
    __shared__ float xs[MM_F32_TILE][MM_F32_TILE + 1], ws[MM_F32_TILE][MM_F32_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int r = blockIdx.x * MM_F32_TILE + tx, t = blockIdx.y * MM_F32_TILE + ty;
    float sum = 0.f;
    for (int k0 = 0; k0 < cols; k0 += MM_F32_TILE) {
        const int xt = blockIdx.y * MM_F32_TILE + ty, wr = blockIdx.x * MM_F32_TILE + ty;
        xs[ty][tx] = xt < n_tokens && k0 + tx < cols ? x[(size_t)xt * cols + k0 + tx] : 0.f;
        ws[ty][tx] = wr < rows && k0 + tx < cols ? w[(size_t)wr * cols + k0 + tx] : 0.f;
        __syncthreads();
#pragma unroll
        for (int k = 0; k < MM_F32_TILE; k++) sum = fmaf(xs[ty][k], ws[tx][k], sum);
        __syncthreads();
    }
    if (t < n_tokens && r < rows) {
        float* o = out + (size_t)t * rows + r;
        const float v = sum + (bias ? bias[r] : 0.f);
        *o = accumulate ? *o + v : v;
    }
}

// ---- launchers --------------------------------------------------------------------------------------

static void check_product(const char* who, const void* w, const void* scales, int wdtype, const void* x,
                          int n_tokens, int rows, int cols) {
    if (wdtype != DT_F32 && wdtype != DT_BF16 && wdtype != DT_F16 && wdtype != DT_INT8) {
        fprintf(stderr, "error: %s: unknown weight dtype %d\n", who, wdtype);
        exit(1);
    }
    if (n_tokens < 1 || rows < 8 || rows % 8 || cols < 8 || cols % 8 || !aligned16(w) || !aligned16(x) ||
        (wdtype == DT_INT8 && (cols % Q8_BLOCK || !scales))) {
        fprintf(stderr, "error: %s: need n_tokens >= 1, rows and cols multiples of 8 (int8: cols of %d, and "
                        "scales), 16-byte aligned w and x (got %d, %d, %d)\n", who, Q8_BLOCK, n_tokens, rows, cols);
        exit(1);
    }
}

// The product on the tensor cores (16-bit or int8 w), handed to `epilogue`: the TMA kernel for
// 16-bit weights unless `simple`; int8 weights always on the simple kernel.
template <typename Epilogue>
static void tensor_core_product(Epilogue epilogue, const void* w, const void* scales, int wdtype, const void* x,
                                int n_tokens, int rows, int cols, bool simple, cudaStream_t stream) {
    if (wdtype == DT_BF16 && !simple) launch_tma<__nv_bfloat16>(epilogue, w, x, n_tokens, rows, cols, stream);
    else if (wdtype == DT_F16 && !simple) launch_tma<__half>(epilogue, w, x, n_tokens, rows, cols, stream);
    else if (wdtype == DT_BF16) launch_simple<__nv_bfloat16, __nv_bfloat16>(epilogue, w, nullptr, x, n_tokens, rows, cols, stream);
    else if (wdtype == DT_F16) launch_simple<__half, __half>(epilogue, w, nullptr, x, n_tokens, rows, cols, stream);
    else launch_simple<__nv_bfloat16, int8_t>(epilogue, w, scales, x, n_tokens, rows, cols, stream);
}

static void product(bool simple, float* out, const void* w, const void* scales, int wdtype, const void* x,
                    const float* bias, int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream) {
    check_product(simple ? "matmul_simple_gpu" : "matmul_gpu", w, scales, wdtype, x, n_tokens, rows, cols);
    if (wdtype == DT_F32) {
        const dim3 grid((rows + MM_F32_TILE - 1) / MM_F32_TILE, (n_tokens + MM_F32_TILE - 1) / MM_F32_TILE);
        matmul_f32_kernel<<<grid, dim3(MM_F32_TILE, MM_F32_TILE), 0, stream>>>(out, (const float*)w, (const float*)x,
                                                                               bias, n_tokens, rows, cols, accumulate);
    } else {
        tensor_core_product(StoreOut{out, bias, accumulate}, w, scales, wdtype, x, n_tokens, rows, cols, simple, stream);
    }
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void matmul_gpu(float* out, const void* w, const void* scales, int wdtype, const void* x,
                           const float* bias, int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream) {
    product(false, out, w, scales, wdtype, x, bias, n_tokens, rows, cols, accumulate, stream);
}

extern "C" void matmul_simple_gpu(float* out, const void* w, const void* scales, int wdtype, const void* x,
                                  const float* bias, int n_tokens, int rows, int cols, int accumulate,
                                  cudaStream_t stream) {
    product(true, out, w, scales, wdtype, x, bias, n_tokens, rows, cols, accumulate, stream);
}

// ---- the LM head's cross entropy, from the tiles' partials ------------------------------------------

static int loss_tiles(int vocab) { return (vocab + LOSS_TILE - 1) / LOSS_TILE; }

extern "C" size_t lm_head_loss_scratch_floats(int n_tokens, int vocab) {
    return (size_t)n_tokens * (2 * loss_tiles(vocab) + 1);  // the partials, then the target logits
}

// One block per token: nll = M + log(sum over tiles of sum_i exp(m_i - M)) - target logit, M the max
// of the tiles' maxima. A NaN partial makes the sum NaN.
__global__ void lm_head_loss_merge_kernel(float* nll, const float2* partials, const float* target_logit,
                                          const int* targets, int n_tiles, int vocab) {
    const float2* p = partials + (size_t)blockIdx.x * n_tiles;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n_tiles; i += blockDim.x) m = fmaxf(m, p[i].x);
    m = block_max(m);
    float sum = 0.f;
    for (int i = threadIdx.x; i < n_tiles; i += blockDim.x) sum += p[i].y * expf(p[i].x - m);
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const int target = targets[blockIdx.x];
        nll[blockIdx.x] = target >= 0 && target < vocab ? m + logf(sum) - target_logit[blockIdx.x] : NAN;
    }
}

extern "C" void lm_head_loss_gpu(float* nll, const void* w, const void* scales, int wdtype, const void* x,
                                 const int* targets, int n_tokens, int vocab, int dim, float* scratch, int simple,
                                 cudaStream_t stream) {
    check_product("lm_head_loss_gpu", w, scales, wdtype, x, n_tokens, vocab, dim);
    if (wdtype == DT_F32) {
        fprintf(stderr, "error: lm_head_loss_gpu: fp32 weights have no tensor-core path\n");
        exit(1);
    }
    const int n_tiles = loss_tiles(vocab);
    float2* partials = reinterpret_cast<float2*>(scratch);
    float* target_logit = scratch + (size_t)2 * n_tokens * n_tiles;
    tensor_core_product(LossPartials{partials, target_logit, targets, n_tiles}, w, scales, wdtype, x, n_tokens, vocab,
                        dim, simple, stream);
    CUDA_CHECK(cudaGetLastError());
    lm_head_loss_merge_kernel<<<n_tokens, 256, 0, stream>>>(nll, partials, target_logit, targets, n_tiles, vocab);
    CUDA_CHECK(cudaGetLastError());
}

// ---- SwiGLU ---------------------------------------------------------------------------------------

// h (n_tokens, hidden) of O = silu(gate) * up, gate_up (n_tokens, 2*hidden) = [gate | up] per token.
// One thread per 4 outputs (hidden % 4 == 0): 16-byte loads.
template <typename O>
__global__ void swiglu_kernel(O* h, const float* gate_up, int n_tokens, int hidden) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= (size_t)n_tokens * hidden) return;
    const size_t t = i / hidden, j = i % hidden;
    const float4 g = *reinterpret_cast<const float4*>(gate_up + t * 2 * hidden + j);
    const float4 u = *reinterpret_cast<const float4*>(gate_up + t * 2 * hidden + hidden + j);
    store4(h + i, make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z), silu_mul(g.w, u.w)));
}

extern "C" void swiglu_gpu(void* h, int h_dtype, const float* gate_up, int n_tokens, int hidden, cudaStream_t stream) {
    if (hidden % 4 || !aligned16(h) || !aligned16(gate_up)) {
        fprintf(stderr, "error: swiglu_gpu: hidden %d is not a multiple of 4, or unaligned buffers\n", hidden);
        exit(1);
    }
    const size_t threads = (size_t)n_tokens * hidden / 4;
    DISPATCH_ACT(h_dtype, "swiglu_gpu",
                 (swiglu_kernel<A><<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>((A*)h, gate_up, n_tokens,
                                                                                          hidden)));
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void swiglu_matmul_gpu(void* h, const void* w_gate_up, const void* scales, int wdtype, const void* x,
                                  int n_tokens, int hidden, int dim, float* gate_up, int simple,
                                  cudaStream_t stream) {
    if (simple || (wdtype != DT_BF16 && wdtype != DT_F16)) {  // the chain: the product, then SwiGLU
        product(simple, gate_up, w_gate_up, scales, wdtype, x, nullptr, n_tokens, 2 * hidden, dim, 0, stream);
        swiglu_gpu(h, matmul_input_dtype(wdtype), gate_up, n_tokens, hidden, stream);
        return;
    }
    check_product("swiglu_matmul_gpu", w_gate_up, scales, wdtype, x, n_tokens, 2 * hidden, dim);
    if (wdtype == DT_BF16)
        launch_tma<__nv_bfloat16, 256>(SwiGLUOut<__nv_bfloat16>{(__nv_bfloat16*)h}, w_gate_up, x, n_tokens, 2 * hidden,
                                       dim, stream);
    else
        launch_tma<__half, 256>(SwiGLUOut<__half>{(__half*)h}, w_gate_up, x, n_tokens, 2 * hidden, dim, stream);
    CUDA_CHECK(cudaGetLastError());
}

// ---- the attention's inputs: the qkv product with QK-norm, RoPE and the cache stores -----------------

template <typename KV, int HD>
static void qkv_rope_product(void* q_out, const void* wqkv, const void* scales, int wdtype, const void* x,
                             const float* bias, const float* q_norm, const float* k_norm, float k_scale,
                             void* k_cache, void* v_cache, const float* rope, int pos0, int n_tokens, int n_heads,
                             int n_kv_heads, int dim, float eps, cudaStream_t stream) {
    const QKVRopeOut<KV, HD> epilogue{(KV*)q_out, (KV*)k_cache, (KV*)v_cache, bias, q_norm, k_norm,
                                      (const float4*)rope, k_scale, eps, pos0, n_heads, n_kv_heads};
    tensor_core_product(epilogue, wqkv, scales, wdtype, x, n_tokens, (n_heads + 2 * n_kv_heads) * HD, dim, false,
                        stream);
}

extern "C" void qkv_rope_matmul_gpu(void* q_out, const void* wqkv, const void* scales, int wdtype, const void* x,
                                    const float* bias, const float* q_norm, const float* k_norm, float k_scale,
                                    void* k_cache, void* v_cache, int kv_dtype, const float* rope, int pos0,
                                    int n_tokens, int n_heads, int n_kv_heads, int head_dim, int dim, float theta,
                                    float eps, float* qkv, int simple, cudaStream_t stream) {
    const int rows = (n_heads + 2 * n_kv_heads) * head_dim;
    if (simple || wdtype == DT_F32 || (head_dim != 64 && head_dim != 128)) {  // the chain: the product, then rope.cu
        product(simple, qkv, wqkv, scales, wdtype, x, bias, n_tokens, rows, dim, 0, stream);
        qk_norm_rope_batch_gpu(q_out, qkv, q_norm, k_norm, k_scale, k_cache, v_cache, kv_dtype, pos0, n_tokens,
                               n_heads, n_kv_heads, head_dim, theta, eps, stream);
        return;
    }
    check_product("qkv_rope_matmul_gpu", wqkv, scales, wdtype, x, n_tokens, rows, dim);
    if ((kv_dtype != DT_BF16 && kv_dtype != DT_F16) || !aligned16(rope)) {
        fprintf(stderr, "error: qkv_rope_matmul_gpu: KV cache dtype %d is not bf16 or fp16, or the rope table is "
                        "not 16-byte aligned\n", kv_dtype);
        exit(1);
    }
    const bool bf16 = kv_dtype == DT_BF16, hd128 = head_dim == 128;
    auto launch = bf16 ? (hd128 ? qkv_rope_product<__nv_bfloat16, 128> : qkv_rope_product<__nv_bfloat16, 64>)
                       : (hd128 ? qkv_rope_product<__half, 128> : qkv_rope_product<__half, 64>);
    launch(q_out, wqkv, scales, wdtype, x, bias, q_norm, k_norm, k_scale, k_cache, v_cache, rope, pos0, n_tokens, n_heads,
           n_kv_heads, dim, eps, stream);
    CUDA_CHECK(cudaGetLastError());
}
