// attention.cu: decode attention of one query token over the KV cache (flash-decoding), the
// whole attention half of a layer fused into one cooperative kernel, and causal flash attention
// for a batch of prefill tokens.
//
// Unfused, attention_gpu: two kernels.
//   1. attention_chunk_kernel, grid (n_chunks, n_kv_heads * n_subgroups). Cache rows 0..*pos are cut
//      into n_chunks chunks of equal length (a multiple of ATT_ROW_GRANULE rows). n_chunks depends
//      on seq_len only, never on *pos, which lives on the device (so a step can be captured in a
//      CUDA graph): blocks whose chunk starts past *pos exit at once. A block reads its chunk of one
//      KV head once and serves every query head of that KV group from it (GQA; up to ATT_MAX_GROUP
//      heads per block, larger groups are split into subgroups), with an online softmax in fp32. It
//      writes, per query head, the partial (running max m, sum l, unnormalised output acc[hd]).
//   2. attention_merge_kernel, one block per query head: rescales the active chunks' partials to
//      their common max, sums and normalises them.
// Fused, attention_fused_gpu: one cooperative kernel, grid = resident blocks per SM x SMs, with a
// grid.sync() between its phases:
//   1. each block computes rms(x) itself and keeps the normalised x in shared memory; warps compute
//      rows of qkv = wqkv . xn + bqkv
//   2. one warp per head: q_norm/k_norm, RoPE, K/V cache store (as qk_norm_rope_gpu)
//   3. (chunk, kv head, subgroup) work items over the blocks: step 1 of the unfused path
//   4. one block per query head: step 2 of the unfused path, into att
//   5. warps compute rows of x += wo . att (the residual add)
// Both paths call the same device functions, so they compute the same function.
// Prefill, attention_prefill_gpu: T queries at positions pos0.. against cache rows 0..pos0+t, on
// the tensor cores (mma.sync) for head_dim 64 and 128, tiles of 64 queries x 64 keys in shared
// memory, online softmax in fp32; other head_dims on a plain one-warp-per-query kernel.
#include <cooperative_groups.h>
#include "common.cuh"
#include "tensor_core.cuh"

namespace cg = cooperative_groups;

constexpr int ATT_THREADS = 128;       // both the chunk kernel and the fused kernel
constexpr int ATT_WARPS = ATT_THREADS / 32;
constexpr int ATT_MAX_GROUP = 8;       // query heads served per block: Qwen GQA ratios are 1..8; the
                                       // kernels are instantiated for a cap G of 2, 4 or 8 heads, the
                                       // smallest that holds the group, as the softmax state lives in registers
constexpr int ATT_MAX_CHUNKS = 64;
constexpr int ATT_ROW_GRANULE = 16;    // chunk lengths are multiples of this: short contexts still
                                       // spread over many blocks (pos 128: 9 chunks of 16 rows per KV head)

static __host__ __device__ int attention_n_chunks(int seq_len) {
    const int n = (seq_len + ATT_ROW_GRANULE - 1) / ATT_ROW_GRANULE;
    return n < 1 ? 1 : n > ATT_MAX_CHUNKS ? ATT_MAX_CHUNKS : n;
}
// rows per chunk for len = *pos + 1 attended rows
static __device__ int attention_chunk_rows(int len, int n_chunks) {
    const int rows = (len + n_chunks - 1) / n_chunks;
    return (rows + ATT_ROW_GRANULE - 1) / ATT_ROW_GRANULE * ATT_ROW_GRANULE;
}

extern "C" size_t attention_scratch_floats(int n_heads, int head_dim, int seq_len) {
    return (size_t)n_heads * attention_n_chunks(seq_len) * (head_dim + 2);  // (m, l, acc[hd]) each
}

template <int HD, int G> struct AttendShared {
    float q[G][HD];               // the served queries, pre-multiplied by scale
    float acc[ATT_WARPS][G][HD];  // per-warp softmax states, merged at the end
    float m[ATT_WARPS][G], l[ATT_WARPS][G];
};

__device__ __forceinline__ float rescale_factor(float m, float m_new) {  // exp(m - m_new), 0 for no rows
    return m == -INFINITY ? 0.f : expf(m - m_new);
}

// One block: the chunk `chunk` of KV head kv_head for the query heads of subgroup `subgroup` (G heads
// at most) of its group. q (n_heads, HD); caches (seq_len, n_kv_heads, HD); len = rows attended (*pos + 1);
// writes scratch partials ((head * n_chunks + chunk) * (HD + 2)): m, l, acc[HD].
// Lane layout: a cache row is read by LPR = HD/8 lanes, 16 bytes each, so a warp reads RPW = 32/LPR
// rows per load; each lane keeps the softmax state of its 8 dims for every served head.
// The cache is read coherently (common.cuh, load16): in the fused kernel, row len - 1 was stored by
// another block of the same launch before the grid.sync() that precedes this call, where the
// read-only path (__ldg) is undefined. The unfused chunk kernel runs the same loads; a block reads
// each of its rows once, so skipping L1 costs it nothing.
template <typename KV, int HD, int G>
__device__ void attend_chunk(AttendShared<HD, G>& sh, float* scratch, const float* q, const KV* k_cache,
                             const KV* v_cache, int kv_head, int subgroup, int chunk, int len,
                             int n_chunks, int n_heads, int n_kv_heads, float scale) {
    // U: cache rows per lane group loaded before any is used; fewer when the state of 8 heads takes the registers
    constexpr int LPR = HD / 8, RPW = 32 / LPR, U = G <= 2 ? 4 : 2;
    const int rows = attention_chunk_rows(len, n_chunks), start = chunk * rows;
    if (start >= len) return;
    const int end = min(start + rows, len);
    const int group_size = n_heads / n_kv_heads;
    const int h0 = kv_head * group_size + subgroup * G;
    const int group = min(G, group_size - subgroup * G);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int seg = lane % LPR, row_in_load = lane / LPR;

    for (int i = threadIdx.x; i < group * HD; i += blockDim.x)
        sh.q[i / HD][i % HD] = q[(size_t)h0 * HD + i] * scale;
    __syncthreads();

    float m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.f;
    }
    for (int base = start + warp * RPW * U; base < end; base += ATT_WARPS * RPW * U) {
        Pack8<KV> kp[U], vp[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int r = base + u * RPW + row_in_load;
            valid[u] = r < end;
            const size_t off = ((size_t)r * n_kv_heads + kv_head) * HD + seg * 8;
            kp[u] = valid[u] ? load_pack8<KV, true>(k_cache + off) : zero_pack8<KV>();
            vp[u] = valid[u] ? load_pack8<KV, true>(v_cache + off) : zero_pack8<KV>();
        }
        // scores s[u][g] = q_g . k_row, summed over the row's LPR lanes
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float kf[8];
            unpack8(kp[u], kf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g >= group) break;
                const float4 qa = *reinterpret_cast<const float4*>(&sh.q[g][seg * 8]);
                const float4 qb = *reinterpret_cast<const float4*>(&sh.q[g][seg * 8 + 4]);
                float d = qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                          qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
#pragma unroll
                for (int o = LPR / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                s[u][g] = valid[u] ? d : -INFINITY;
            }
        }
        // online softmax: s becomes the weights p, the state is rescaled to the new max
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            float m_new = m[g];
#pragma unroll
            for (int u = 0; u < U; u++) m_new = fmaxf(m_new, s[u][g]);
            if (m_new == -INFINITY) {  // no valid row for this lane group yet
#pragma unroll
                for (int u = 0; u < U; u++) s[u][g] = 0.f;
                continue;
            }
            const float corr = rescale_factor(m[g], m_new);
            m[g] = m_new;
            l[g] *= corr;
#pragma unroll
            for (int j = 0; j < 8; j++) acc[g][j] *= corr;
#pragma unroll
            for (int u = 0; u < U; u++) {
                s[u][g] = expf(s[u][g] - m_new);
                l[g] += s[u][g];
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float vf[8];
            unpack8(vp[u], vf);
#pragma unroll
            for (int g = 0; g < G; g++) {
                if (g >= group) break;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = fmaf(s[u][g], vf[j], acc[g][j]);
            }
        }
    }
    // merge the warp's row groups (lanes with the same seg), then the warps through shared memory
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            const float m_other = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l_other = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float m_new = fmaxf(m[g], m_other);
            const float a = rescale_factor(m[g], m_new), b = rescale_factor(m_other, m_new);
            l[g] = l[g] * a + l_other * b;
#pragma unroll
            for (int j = 0; j < 8; j++)
                acc[g][j] = acc[g][j] * a + __shfl_xor_sync(0xffffffffu, acc[g][j], o) * b;
            m[g] = m_new;
        }
    }
    if (row_in_load == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (g >= group) break;
            if (seg == 0) { sh.m[warp][g] = m[g]; sh.l[warp][g] = l[g]; }
#pragma unroll
            for (int j = 0; j < 8; j++) sh.acc[warp][g][seg * 8 + j] = acc[g][j];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float m_all = -INFINITY;  // finite: warp 0 holds the chunk's first row
        for (int w = 0; w < ATT_WARPS; w++) m_all = fmaxf(m_all, sh.m[w][g]);
        float l_all = 0.f, a_all = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) {
            const float f = rescale_factor(sh.m[w][g], m_all);
            l_all += sh.l[w][g] * f;
            a_all += sh.acc[w][g][d] * f;
        }
        float* part = scratch + ((size_t)(h0 + g) * n_chunks + chunk) * (HD + 2);
        if (d == 0) { part[0] = m_all; part[1] = l_all; }
        part[2 + d] = a_all;
    }
    __syncthreads();  // sh is reused by the block's next work item
}

// One block: out (hd) of one query head from its chunk partials (n_chunks, hd + 2), of which the
// first ceil(len / chunk_rows) were written.
__device__ void merge_head(float* out, const float* partials, int len, int n_chunks, int hd) {
    const int rows = attention_chunk_rows(len, n_chunks), n_active = (len + rows - 1) / rows;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float m_all = -INFINITY;
        for (int c = 0; c < n_active; c++) m_all = fmaxf(m_all, partials[c * (hd + 2)]);
        float l_all = 0.f, a_all = 0.f;
        for (int c = 0; c < n_active; c++) {
            const float* p = partials + c * (hd + 2);
            const float f = expf(p[0] - m_all);
            l_all += p[1] * f;
            a_all += p[2 + d] * f;
        }
        out[d] = a_all / l_all;
    }
}

// ---- unfused -------------------------------------------------------------------------------------

template <typename KV, int HD, int G>
__global__ void __launch_bounds__(ATT_THREADS)
attention_chunk_kernel(float* scratch, const float* q, const KV* k_cache, const KV* v_cache,
                       const int* pos, int n_heads, int n_kv_heads, int n_chunks, float scale) {
    griddep_wait();
    __shared__ AttendShared<HD, G> sh;
    const int n_sub = (n_heads / n_kv_heads + G - 1) / G;
    attend_chunk<KV, HD, G>(sh, scratch, q, k_cache, v_cache, blockIdx.y / n_sub, blockIdx.y % n_sub,
                         blockIdx.x, *pos + 1, n_chunks, n_heads, n_kv_heads, scale);
}

// out (n_heads, hd); one block per head
__global__ void attention_merge_kernel(float* out, const float* scratch, const int* pos, int head_dim,
                                       int n_chunks) {
    griddep_wait();
    const int h = blockIdx.x;
    merge_head(out + (size_t)h * head_dim, scratch + (size_t)h * n_chunks * (head_dim + 2), *pos + 1,
               n_chunks, head_dim);
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

static void check_attention_shape(int kv_dtype, int n_heads, int n_kv_heads, int head_dim, const char* who) {
    if (kv_dtype != DT_BF16 && kv_dtype != DT_F16) {
        fprintf(stderr, "error: %s: KV cache dtype %d is not bf16 or fp16\n", who, kv_dtype);
        exit(1);
    }
    if (head_dim != 8 && head_dim != 16 && head_dim != 32 && head_dim != 64 && head_dim != 128) {
        fprintf(stderr, "error: %s: head_dim %d is not 8, 16, 32, 64 or 128\n", who, head_dim);
        exit(1);
    }
    if (n_kv_heads < 1 || n_heads % n_kv_heads != 0) {
        fprintf(stderr, "error: %s: n_heads %d is not a multiple of n_kv_heads %d\n", who, n_heads, n_kv_heads);
        exit(1);
    }
}

#define DISPATCH_HD(HD_VAR, BODY)                                 \
    switch (HD_VAR) {                                             \
        case 8: { constexpr int HD = 8; BODY; } break;            \
        case 16: { constexpr int HD = 16; BODY; } break;          \
        case 32: { constexpr int HD = 32; BODY; } break;          \
        case 64: { constexpr int HD = 64; BODY; } break;          \
        default: { constexpr int HD = 128; BODY; } break;         \
    }

// G: the group cap for n_heads / n_kv_heads query heads per KV head
#define DISPATCH_GROUP(GROUP, BODY)                               \
    if ((GROUP) <= 2) { constexpr int G = 2; BODY; }              \
    else if ((GROUP) <= 4) { constexpr int G = 4; BODY; }         \
    else { constexpr int G = ATT_MAX_GROUP; BODY; }

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

// ---- fused ---------------------------------------------------------------------------------------

// dynamic shared memory: max(dim, n_heads * HD) floats (the normalised x, then att)
template <typename W, typename KV, int HD, int G>
__global__ void __launch_bounds__(ATT_THREADS)
attention_fused_kernel(AttentionLayer p, bool vec_qkv, bool vec_o) {
    cg::grid_group grid = cg::this_grid();
    extern __shared__ float4 dynamic_smem[];
    float* xs = reinterpret_cast<float*>(dynamic_smem);
    __shared__ AttendShared<HD, G> sh;
    const int pos = *p.pos, q_dim = p.n_heads * HD, kv_dim = p.n_kv_heads * HD;
    const int qkv_rows = q_dim + 2 * kv_dim;
    const int warp_id = blockIdx.x * ATT_WARPS + threadIdx.x / 32, n_warps = gridDim.x * ATT_WARPS;
    const bool lane0 = threadIdx.x % 32 == 0;
    const W* wqkv = (const W*)p.wqkv;
    const W* wo = (const W*)p.wo;
    float *q = p.qkv, *k = p.qkv + q_dim, *v = p.qkv + q_dim + kv_dim;

    // 1. qkv = wqkv . rmsnorm(x) + bqkv
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) ss = fmaf(p.x[i], p.x[i], ss);
    const float inv_rms = rsqrtf(block_sum(ss) / p.dim + p.eps);
    for (int i = threadIdx.x; i < p.dim; i += blockDim.x) xs[i] = p.x[i] * inv_rms * p.rms_att[i];
    __syncthreads();
    for (int row = warp_id; row < qkv_rows; row += n_warps) {
        const W* row_ptr[1] = {wqkv + (size_t)row * p.dim};
        float dot[1];
        warp_dot_rows<W, 1>(dot, row_ptr, xs, p.dim, vec_qkv);
        if (lane0) p.qkv[row] = dot[0] + (p.bqkv ? p.bqkv[row] : 0.f);
    }
    grid.sync();

    // 2. q_norm/k_norm, RoPE, cache store
    for (int head = warp_id; head < p.n_heads + p.n_kv_heads; head += n_warps)
        qk_norm_rope_head<KV>(head, q, k, v, p.q_norm, p.k_norm, p.k_scale, (KV*)p.k_cache,
                              (KV*)p.v_cache, pos, p.n_heads, p.n_kv_heads, HD, p.theta, p.eps);
    grid.sync();

    // 3. chunk partials; chunk-major items, so the active (early) chunks spread over all blocks
    const int n_chunks = attention_n_chunks(p.seq_len);
    const int n_sub = (p.n_heads / p.n_kv_heads + G - 1) / G;
    const int items_per_chunk = p.n_kv_heads * n_sub;
    const float scale = p.k_scale / sqrtf((float)HD);
    for (int item = blockIdx.x; item < n_chunks * items_per_chunk; item += gridDim.x) {
        const int chunk = item / items_per_chunk, kv_sub = item % items_per_chunk;
        attend_chunk<KV, HD, G>(sh, p.scratch, q, (const KV*)p.k_cache, (const KV*)p.v_cache, kv_sub / n_sub,
                             kv_sub % n_sub, chunk, pos + 1, n_chunks, p.n_heads, p.n_kv_heads, scale);
    }
    grid.sync();

    // 4. merge into att
    for (int h = blockIdx.x; h < p.n_heads; h += gridDim.x)
        merge_head(p.att + (size_t)h * HD, p.scratch + (size_t)h * n_chunks * (HD + 2), pos + 1, n_chunks, HD);
    grid.sync();

    // 5. x += wo . att
    for (int i = threadIdx.x; i < q_dim; i += blockDim.x) xs[i] = p.att[i];
    __syncthreads();
    for (int row = warp_id; row < p.dim; row += n_warps) {
        const W* row_ptr[1] = {wo + (size_t)row * q_dim};
        float dot[1];
        warp_dot_rows<W, 1>(dot, row_ptr, xs, q_dim, vec_o);
        if (lane0) p.x[row] += dot[0];
    }
}

template <typename W, typename KV, int HD, int G>
static void launch_attention_fused(const AttentionLayer* layer, cudaStream_t stream) {
    const void* kernel = (const void*)attention_fused_kernel<W, KV, HD, G>;
    const int q_dim = layer->n_heads * HD;
    const size_t smem = (size_t)(layer->dim > q_dim ? layer->dim : q_dim) * sizeof(float);
    // the grid (resident blocks per SM x SMs) is worked out once per instantiation and smem size
    static size_t grid_smem = 0;
    static int grid_blocks = 0;
    if (grid_blocks == 0 || grid_smem != smem) {
        int device, cooperative, sms, blocks_per_sm;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
        CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        if (!cooperative) {
            fprintf(stderr, "error: attention_fused_gpu: the device does not support cooperative launches\n");
            exit(1);
        }
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, ATT_THREADS, smem));
        if (blocks_per_sm < 1) {
            fprintf(stderr, "error: attention_fused_gpu: no block fits on an SM (%zu bytes of dynamic shared memory)\n", smem);
            exit(1);
        }
        grid_smem = smem;
        grid_blocks = blocks_per_sm * sms;
    }
    AttentionLayer p = *layer;
    bool vec_qkv = p.dim % 8 == 0 && aligned16(p.wqkv), vec_o = aligned16(p.wo);
    void* args[] = {&p, &vec_qkv, &vec_o};
    CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(grid_blocks), dim3(ATT_THREADS), args, smem, stream));
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void attention_fused_gpu(const AttentionLayer* layer, cudaStream_t stream) {
    const AttentionLayer* L = layer;
    check_attention_shape(L->kv_dtype, L->n_heads, L->n_kv_heads, L->head_dim, "attention_fused_gpu");
    if (L->wdtype != DT_F32 && L->wdtype != DT_BF16 && L->wdtype != DT_F16) {
        fprintf(stderr, "error: attention_fused_gpu: unknown weight dtype %d\n", L->wdtype);
        exit(1);
    }
#define FUSED_FOR_KV(W)                                                                              \
    if (L->kv_dtype == DT_BF16) {                                                                    \
        DISPATCH_GROUP(L->n_heads / L->n_kv_heads, DISPATCH_HD(L->head_dim,                          \
            (launch_attention_fused<W, __nv_bfloat16, HD, G>(L, stream))));                          \
    } else {                                                                                         \
        DISPATCH_GROUP(L->n_heads / L->n_kv_heads, DISPATCH_HD(L->head_dim,                          \
            (launch_attention_fused<W, __half, HD, G>(L, stream))));                                 \
    }
    if (L->wdtype == DT_F32) { FUSED_FOR_KV(float) }
    else if (L->wdtype == DT_BF16) { FUSED_FOR_KV(__nv_bfloat16) }
    else { FUSED_FOR_KV(__half) }
#undef FUSED_FOR_KV
}

// ---- causal flash attention on the tensor cores (head_dim 64, 128) ------------------------------

// One block = 64 queries of one head, 4 warps of 16 query rows each. K/V tiles of 64 cache rows are
// double-buffered through cp.async; S = Q K^T and O += P V run on mma.sync with fp32 accumulation;
// the softmax is online, in fp32, in the log2 domain; P goes back to 16 bits as the A operand of
// P V straight from the S accumulators (the C and A fragment layouts line up). Per tile and warp:
// 2 * 16*64*D FLOPs of mma for 2*64*D*2 bytes of shared-memory tile (read by all 4 warps).
constexpr int FA_BQ = 64, FA_BKV = 64, FA_WARPS = 4;

template <int D> constexpr size_t fa_smem_bytes() { return (size_t)(FA_BQ + 4 * FA_BKV) * D * 2; }

template <typename T, int D>
__global__ void __launch_bounds__(FA_WARPS * 32) attention_prefill_tc_kernel(
        float* out, const float* qkv, const T* k_cache, const T* v_cache, int pos0, int n_tokens, int n_heads,
        int n_kv_heads, float scale_log2) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    extern __shared__ uint4 fa_smem[];
    uint4* sq = fa_smem;             // [FA_BQ][CH]
    uint4* sk = sq + FA_BQ * CH;     // [2][FA_BKV][CH]
    uint4* sv = sk + 2 * FA_BKV * CH;  // [2][FA_BKV][CH]
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;  // the longest (latest) query tiles start first
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
    const size_t qkv_stride = (size_t)(n_heads + 2 * n_kv_heads) * D;
    const int n_keys = pos0 + min(q0 + FA_BQ, n_tokens);  // cache rows any query of the tile sees
    const int n_tiles = (n_keys + FA_BKV - 1) / FA_BKV;

    // cache rows past n_keys are zero-filled: they may hold anything, and 0 * NaN would leak into O
    auto load_kv = [&](int tile, int buf) {
        for (int i = tid; i < FA_BKV * CH; i += FA_WARPS * 32) {
            const int r = i / CH, ch = i % CH, key = tile * FA_BKV + r;
            const bool valid = key < n_keys;
            const size_t off = valid ? ((size_t)key * n_kv_heads + kvh) * D + ch * 8 : 0;
            const int dst = buf * FA_BKV * CH + swizzle(r, ch, CH);
            cp_async16(&sk[dst], k_cache + off, valid);
            cp_async16(&sv[dst], v_cache + off, valid);
        }
    };
    load_kv(0, 0);
    cp_async_commit();
    for (int i = tid; i < FA_BQ * CH; i += FA_WARPS * 32) {  // Q: fp32 -> T, rows past n_tokens zero
        const int r = i / CH, ch = i % CH, t = q0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (t < n_tokens) {
            const float4* p = reinterpret_cast<const float4*>(qkv + (size_t)t * qkv_stride + (size_t)h * D + ch * 8);
            v = pack8<T>(__ldg(p), __ldg(p + 1));
        }
        sq[swizzle(r, ch, CH)] = v;
    }
    __syncthreads();
    uint32_t qf[D / 16][4];  // this warp's 16 query rows as A fragments, kept for the whole loop
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldmatrix_x4(qf[kk], &sq[swizzle(warp * 16 + lane % 16, kk * 2 + lane / 16, CH)]);

    float o[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows lane/4 and lane/4 + 8 of the warp
    const int warp_pos = pos0 + q0 + warp * 16;              // position of the warp's first query
    for (int j = 0; j < n_tiles; j++) {
        const int buf = j % 2;
        if (j + 1 < n_tiles) load_kv(j + 1, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const uint4* kb = sk + buf * FA_BKV * CH;
        const uint4* vb = sv + buf * FA_BKV * CH;

        float s[FA_BKV / 8][4] = {};  // S (16 queries x 64 keys) for this warp
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int nj = 0; nj < FA_BKV / 16; nj++) {
                uint32_t b[4];
                ldmatrix_x4(b, &kb[swizzle(nj * 16 + lane % 8 + (lane / 16) * 8, kk * 2 + (lane / 8) % 2, CH)]);
                mma_16816<T>(s[2 * nj], qf[kk], b[0], b[1]);
                mma_16816<T>(s[2 * nj + 1], qf[kk], b[2], b[3]);
            }
        if (j * FA_BKV + FA_BKV - 1 > warp_pos) {  // the tile reaches past some query: causal mask
#pragma unroll
            for (int ni = 0; ni < FA_BKV / 8; ni++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = j * FA_BKV + ni * 8 + (lane % 4) * 2 + e % 2;
                    if (key > warp_pos + lane / 4 + (e / 2) * 8) s[ni][e] = -INFINITY;
                }
        }
        // online softmax; every row sees key 0 in tile 0, so m is finite from then on
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = -INFINITY;
#pragma unroll
            for (int ni = 0; ni < FA_BKV / 8; ni++) mx = fmaxf(mx, fmaxf(s[ni][2 * r], s[ni][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx * scale_log2);
            const float corr = exp2f(m[r] - m_new);
            m[r] = m_new;
            l[r] *= corr;  // per-thread partial sum; the quad is summed once at the end
#pragma unroll
            for (int di = 0; di < D / 8; di++) { o[di][2 * r] *= corr; o[di][2 * r + 1] *= corr; }
#pragma unroll
            for (int ni = 0; ni < FA_BKV / 8; ni++)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; e++) {
                    s[ni][e] = exp2f(fmaf(s[ni][e], scale_log2, -m_new));
                    l[r] += s[ni][e];
                }
        }
        // O += P V: P's accumulator pairs are the A fragment of a 16-key step; V via ldmatrix.trans
#pragma unroll
        for (int kk = 0; kk < FA_BKV / 16; kk++) {
            const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                   pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dj = 0; dj < D / 16; dj++) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &vb[swizzle(kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, dj * 2 + lane / 16, CH)]);
                mma_16816<T>(o[2 * dj], a, b[0], b[1]);
                mma_16816<T>(o[2 * dj + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // all warps are done with buffer `buf` before iteration j+1 refills it
    }

    const size_t out_stride = (size_t)n_heads * D;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = 1.f / sum;
        const int t = q0 + warp * 16 + lane / 4 + r * 8;
        if (t >= n_tokens) continue;
        float* dst = out + (size_t)t * out_stride + (size_t)h * D + (lane % 4) * 2;
#pragma unroll
        for (int di = 0; di < D / 8; di++)
            *reinterpret_cast<float2*>(dst + di * 8) = make_float2(o[di][2 * r] * inv, o[di][2 * r + 1] * inv);
    }
}

// ---- any even head_dim <= 256: CUDA cores --------------------------------------------------------

// One warp per (query, head), keys one at a time: lane owns dims lane + 32 i. q is rounded to the
// cache type first, so this computes the same function as the tensor-core kernel.
constexpr int FA_SIMPLE_WARPS = 4, FA_SIMPLE_MAX_DIMS = 8;  // 8 * 32 = head_dim 256

template <typename KV>
__global__ void attention_prefill_simple_kernel(float* out, const float* qkv, const KV* k_cache, const KV* v_cache,
                                                int pos0, int n_tokens, int n_heads, int n_kv_heads, int head_dim,
                                                float scale) {
    const int job = blockIdx.x * FA_SIMPLE_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (job >= n_tokens * n_heads) return;
    const int t = job / n_heads, h = job % n_heads, kvh = h / (n_heads / n_kv_heads);
    const float* q = qkv + (size_t)t * (n_heads + 2 * n_kv_heads) * head_dim + (size_t)h * head_dim;
    float qv[FA_SIMPLE_MAX_DIMS], acc[FA_SIMPLE_MAX_DIMS];
#pragma unroll
    for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? to_float(from_float<KV>(q[d])) : 0.f;
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
    float* dst = out + (size_t)t * n_heads * head_dim + (size_t)h * head_dim;
#pragma unroll
    for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) dst[d] = acc[i] / l;
    }
}

template <typename T, int D>
static void launch_attention_tc(float* out, const float* qkv, const void* k_cache, const void* v_cache, int pos0,
                                int n_tokens, int n_heads, int n_kv_heads, float scale, cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    constexpr size_t smem = fa_smem_bytes<D>();
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_tc_kernel<T, D>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        configured = true;
    }
    const dim3 grid((n_tokens + FA_BQ - 1) / FA_BQ, n_heads);
    attention_prefill_tc_kernel<T, D><<<grid, FA_WARPS * 32, smem, stream>>>(
        out, qkv, (const T*)k_cache, (const T*)v_cache, pos0, n_tokens, n_heads, n_kv_heads,
        scale * 1.4426950408889634f);  // exp(x) = exp2(x log2 e)
}

template <typename T>
static void launch_attention(float* out, const float* qkv, const void* k_cache, const void* v_cache, int pos0,
                             int n_tokens, int n_heads, int n_kv_heads, int head_dim, float scale,
                             cudaStream_t stream) {
    const bool aligned = aligned16(qkv) && aligned16(k_cache) && aligned16(v_cache);
    if (aligned && head_dim == 64) {
        launch_attention_tc<T, 64>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else if (aligned && head_dim == 128) {
        launch_attention_tc<T, 128>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else {
        const int jobs = n_tokens * n_heads;
        attention_prefill_simple_kernel<T><<<(jobs + FA_SIMPLE_WARPS - 1) / FA_SIMPLE_WARPS, FA_SIMPLE_WARPS * 32, 0,
                                             stream>>>(out, qkv, (const T*)k_cache, (const T*)v_cache, pos0,
                                                       n_tokens, n_heads, n_kv_heads, head_dim, scale);
    }
}

extern "C" void attention_prefill_gpu(float* out, const float* qkv, const void* k_cache, const void* v_cache,
                                      int kv_dtype, int pos0, int n_tokens, int n_heads, int n_kv_heads,
                                      int head_dim, float scale, cudaStream_t stream) {
    if (head_dim < 2 || head_dim % 2 || head_dim > 32 * FA_SIMPLE_MAX_DIMS || n_kv_heads < 1 ||
        n_heads % n_kv_heads || n_tokens < 1 || pos0 < 0) {
        fprintf(stderr, "error: attention_prefill_gpu: unsupported shape (head_dim %d, heads %d:%d, %d tokens at %d)\n",
                head_dim, n_heads, n_kv_heads, n_tokens, pos0);
        exit(1);
    }
    if (kv_dtype == DT_BF16) {
        launch_attention<__nv_bfloat16>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, head_dim,
                                        scale, stream);
    } else if (kv_dtype == DT_F16) {
        launch_attention<__half>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, head_dim, scale,
                                 stream);
    } else {
        fprintf(stderr, "error: attention_prefill_gpu: KV cache dtype %d is not bf16 or fp16\n", kv_dtype);
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}
