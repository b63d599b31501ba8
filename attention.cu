// attention.cu: decode attention of one query token over the KV cache as a chain of two kernels
// (the reference path, run.c -a 0; the persistent decode kernel in decode.cu runs the same device
// functions), and causal flash attention for a batch of prefill tokens.
//
// Decode, attention_gpu (flash-decoding; attention.cuh has the math):
//   1. attention_chunk_kernel, grid (n_chunks, n_kv_heads * n_subgroups): one work item per block;
//      blocks whose chunk starts past *pos exit at once.
//   2. attention_merge_kernel, one block per query head: merges the active chunks' partials.
// Prefill, attention_prefill_gpu: T queries at positions pos0.. against cache rows 0..pos0+t, on
// the tensor cores (mma.sync) for head_dim 64 and 128, tiles of 64 queries x 64 keys in shared
// memory, online softmax in fp32; other head_dims on a plain one-warp-per-query kernel.
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
    __shared__ float m_chunk[ATT_MAX_CHUNKS], l_chunk[ATT_MAX_CHUNKS];
    merge_heads(ScratchPartials{scratch}, [&](int h, int d, float value) { out[(size_t)h * head_dim + d] = value; },
                blockIdx.x, 1, m_chunk, l_chunk, *pos + 1, n_chunks, head_dim);
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

// ---- causal flash attention on the tensor cores (head_dim 64, 128) ------------------------------

// One block = 64 queries of one head, 4 warps of 16 query rows each. K/V tiles of 64 cache rows are
// double-buffered through cp.async; S = Q K^T and O += P V run on mma.sync with fp32 accumulation;
// the softmax is online, in fp32, in the log2 domain; P goes back to 16 bits as the A operand of
// P V straight from the S accumulators (the C and A fragment layouts line up). Per tile and warp:
// 2 * 16*64*D FLOPs of mma for 2*64*D*2 bytes of shared-memory tile (read by all 4 warps).
constexpr int FA_BQ = 64, FA_BKV = 64, FA_WARPS = 4;

template <int D> constexpr size_t fa_smem_bytes() { return (size_t)(FA_BQ + 4 * FA_BKV) * D * 2; }

template <typename T, int D, typename O>
__global__ void __launch_bounds__(FA_WARPS * 32) attention_prefill_tc_kernel(
        O* out, const float* qkv, const T* k_cache, const T* v_cache, int pos0, int n_tokens, int n_heads,
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
        O* dst = out + (size_t)t * out_stride + (size_t)h * D + (lane % 4) * 2;
#pragma unroll
        for (int di = 0; di < D / 8; di++) store2(dst + di * 8, o[di][2 * r] * inv, o[di][2 * r + 1] * inv);
    }
}

// ---- any even head_dim <= 256: CUDA cores --------------------------------------------------------

// One warp per (query, head), keys one at a time: lane owns dims lane + 32 i. q is rounded to the
// cache type first, so this computes the same function as the tensor-core kernel.
constexpr int FA_SIMPLE_WARPS = 4, FA_SIMPLE_MAX_DIMS = 8;  // 8 * 32 = head_dim 256

template <typename KV, typename O>
__global__ void attention_prefill_simple_kernel(O* out, const float* qkv, const KV* k_cache, const KV* v_cache,
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
    O* dst = out + (size_t)t * n_heads * head_dim + (size_t)h * head_dim;
#pragma unroll
    for (int i = 0; i < FA_SIMPLE_MAX_DIMS; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) dst[d] = from_float<O>(acc[i] / l);
    }
}

template <typename T, int D, typename O>
static void launch_attention_tc(O* out, const float* qkv, const void* k_cache, const void* v_cache, int pos0,
                                int n_tokens, int n_heads, int n_kv_heads, float scale, cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    constexpr size_t smem = fa_smem_bytes<D>();
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_tc_kernel<T, D, O>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        configured = true;
    }
    const dim3 grid((n_tokens + FA_BQ - 1) / FA_BQ, n_heads);
    attention_prefill_tc_kernel<T, D, O><<<grid, FA_WARPS * 32, smem, stream>>>(
        out, qkv, (const T*)k_cache, (const T*)v_cache, pos0, n_tokens, n_heads, n_kv_heads,
        scale * 1.4426950408889634f);  // exp(x) = exp2(x log2 e)
}

template <typename T, typename O>
static void launch_attention(O* out, const float* qkv, const void* k_cache, const void* v_cache, int pos0,
                             int n_tokens, int n_heads, int n_kv_heads, int head_dim, float scale,
                             cudaStream_t stream) {
    const bool aligned = aligned16(qkv) && aligned16(k_cache) && aligned16(v_cache);
    if (aligned && head_dim == 64) {
        launch_attention_tc<T, 64, O>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else if (aligned && head_dim == 128) {
        launch_attention_tc<T, 128, O>(out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, scale, stream);
    } else {
        const int jobs = n_tokens * n_heads;
        attention_prefill_simple_kernel<T, O><<<(jobs + FA_SIMPLE_WARPS - 1) / FA_SIMPLE_WARPS, FA_SIMPLE_WARPS * 32, 0,
                                             stream>>>(out, qkv, (const T*)k_cache, (const T*)v_cache, pos0,
                                                       n_tokens, n_heads, n_kv_heads, head_dim, scale);
    }
}

extern "C" void attention_prefill_gpu(void* out, int out_dtype, const float* qkv, const void* k_cache, const void* v_cache,
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
            launch_attention<__nv_bfloat16>((A*)out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads,
                                            head_dim, scale, stream);
        else
            launch_attention<__half>((A*)out, qkv, k_cache, v_cache, pos0, n_tokens, n_heads, n_kv_heads, head_dim,
                                     scale, stream);
    });
    CUDA_CHECK(cudaGetLastError());
}
