// rope.cu: per-head q_norm/k_norm, NeoX RoPE and the K/V cache store: for the decoded token at
// position *pos, and for a batch of prefill tokens at positions pos0...
// The math lives in common.cuh (qk_norm_rope_head), shared with the fused attention kernel.
#include "common.cuh"

constexpr int ROPE_WARPS = 4;  // heads per block, one warp each
constexpr int ROPE_MAX_HEAD_DIM = 256;  // prefill attention's limit (kernels.h)

// q (n_heads, hd) and k (n_kv_heads, hd) in place; v (n_kv_heads, hd);
// caches (seq_len, n_kv_heads, hd) of KV, written at row *pos.
template <typename KV>
__global__ void qk_norm_rope_kernel(float* q, float* k, const float* v, const float* q_norm,
                                    const float* k_norm, float k_scale, KV* k_cache, KV* v_cache,
                                    const int* pos, int n_heads, int n_kv_heads, int head_dim,
                                    float theta, float eps) {
    griddep_wait();
    const int head = blockIdx.x * ROPE_WARPS + threadIdx.x / 32;
    if (head >= n_heads + n_kv_heads) return;
    qk_norm_rope_head<KV>(head, q, k, v, q_norm, k_norm, k_scale, k_cache, v_cache, *pos, n_heads,
                          n_kv_heads, head_dim, theta, eps);
}

extern "C" void qk_norm_rope_gpu(float* q, float* k, const float* v, const float* q_norm,
                                 const float* k_norm, float k_scale, void* k_cache, void* v_cache,
                                 int kv_dtype, const int* pos, int n_heads, int n_kv_heads,
                                 int head_dim, float theta, float eps, cudaStream_t stream) {
    const int blocks = (n_heads + n_kv_heads + ROPE_WARPS - 1) / ROPE_WARPS;
    if (kv_dtype == DT_BF16) {
        launch_pdl(qk_norm_rope_kernel<__nv_bfloat16>, blocks, 32 * ROPE_WARPS, 0, stream,
            q, k, v, q_norm, k_norm, k_scale, (__nv_bfloat16*)k_cache, (__nv_bfloat16*)v_cache, pos,
            n_heads, n_kv_heads, head_dim, theta, eps);
    } else if (kv_dtype == DT_F16) {
        launch_pdl(qk_norm_rope_kernel<__half>, blocks, 32 * ROPE_WARPS, 0, stream,
            q, k, v, q_norm, k_norm, k_scale, (__half*)k_cache, (__half*)v_cache, pos, n_heads,
            n_kv_heads, head_dim, theta, eps);
    } else {
        fprintf(stderr, "error: qk_norm_rope_gpu: KV cache dtype %d is not bf16 or fp16\n", kv_dtype);
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}

// ---- prefill: n_tokens at once ------------------------------------------------------------------

constexpr int ROPE_BATCH_WARPS = 4;   // heads per block, one warp each
constexpr int ROPE_BATCH_TOKENS = 8;  // tokens per block: the inverse frequencies (a double pow each) once per 8

// Grid (head groups, token groups). Token t of qkv (n_tokens, (n_heads + 2*n_kv_heads) * hd) is at
// position pos0 + t; the per-head math is the decode path's (common.cuh), so prefill and decode
// write bit-identical cache rows. q is also stored, rounded to KV, as the attention reads it.
template <typename KV>
__global__ void qk_norm_rope_batch_kernel(KV* q_out, float* qkv, const float* q_norm, const float* k_norm,
                                          float k_scale, KV* k_cache, KV* v_cache, int pos0, int n_tokens,
                                          int n_heads, int n_kv_heads, int head_dim, float theta, float eps) {
    __shared__ float inv_freq[ROPE_MAX_HEAD_DIM / 2];
    for (int i = threadIdx.x; i < head_dim / 2; i += blockDim.x) inv_freq[i] = rope_inv_freq(i, head_dim, theta);
    __syncthreads();
    const int head = blockIdx.x * ROPE_BATCH_WARPS + threadIdx.x / 32;
    if (head >= n_heads + n_kv_heads) return;
    const int t_end = min(n_tokens, (blockIdx.y + 1) * ROPE_BATCH_TOKENS);
    for (int t = blockIdx.y * ROPE_BATCH_TOKENS; t < t_end; t++) {
        float* q = qkv + (size_t)t * (n_heads + 2 * n_kv_heads) * head_dim;
        float* k = q + (size_t)n_heads * head_dim;
        const float* v = k + (size_t)n_kv_heads * head_dim;
        if (head < n_heads) {
            norm_rope_head<KV>(q + (size_t)head * head_dim, q_norm, head_dim, pos0 + t, theta, eps,
                               q_out + ((size_t)t * n_heads + head) * head_dim, 1.f, inv_freq);
        } else {
            qk_norm_rope_head<KV>(head, q, k, v, q_norm, k_norm, k_scale, k_cache, v_cache, pos0 + t, n_heads,
                                  n_kv_heads, head_dim, theta, eps, inv_freq);
        }
    }
}

extern "C" void qk_norm_rope_batch_gpu(void* q_out, float* qkv, const float* q_norm, const float* k_norm, float k_scale,
                                       void* k_cache, void* v_cache, int kv_dtype, int pos0, int n_tokens,
                                       int n_heads, int n_kv_heads, int head_dim, float theta, float eps,
                                       cudaStream_t stream) {
    if (head_dim > ROPE_MAX_HEAD_DIM || head_dim % 2) {
        fprintf(stderr, "error: qk_norm_rope_batch_gpu: head_dim %d is odd or over %d\n", head_dim, ROPE_MAX_HEAD_DIM);
        exit(1);
    }
    const dim3 grid((n_heads + n_kv_heads + ROPE_BATCH_WARPS - 1) / ROPE_BATCH_WARPS,
                    (n_tokens + ROPE_BATCH_TOKENS - 1) / ROPE_BATCH_TOKENS);
    if (kv_dtype == DT_BF16) {
        qk_norm_rope_batch_kernel<__nv_bfloat16><<<grid, 32 * ROPE_BATCH_WARPS, 0, stream>>>(
            (__nv_bfloat16*)q_out, qkv, q_norm, k_norm, k_scale, (__nv_bfloat16*)k_cache, (__nv_bfloat16*)v_cache, pos0, n_tokens, n_heads,
            n_kv_heads, head_dim, theta, eps);
    } else if (kv_dtype == DT_F16) {
        qk_norm_rope_batch_kernel<__half><<<grid, 32 * ROPE_BATCH_WARPS, 0, stream>>>(
            (__half*)q_out, qkv, q_norm, k_norm, k_scale, (__half*)k_cache, (__half*)v_cache, pos0, n_tokens, n_heads, n_kv_heads,
            head_dim, theta, eps);
    } else {
        fprintf(stderr, "error: qk_norm_rope_batch_gpu: KV cache dtype %d is not bf16 or fp16\n", kv_dtype);
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}

// ---- RoPE's cos and sin for a batch of positions --------------------------------------------------

// table (n_tokens, head_dim / 2) of (cos, sin) of (pos0 + t) * inv_freq[i]: the values norm_rope_head
// computes, once per prefill chunk for every layer's qkv epilogue (matmul.cu). One thread per pair.
__global__ void rope_table_kernel(float2* table, int pos0, int n_tokens, int head_dim, float theta) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, half = head_dim / 2;
    if (i >= n_tokens * half) return;
    float s, c;
    sincosf((float)(pos0 + i / half) * rope_inv_freq(i % half, head_dim, theta), &s, &c);
    table[i] = make_float2(c, s);
}

extern "C" void rope_table_gpu(float* table, int pos0, int n_tokens, int head_dim, float theta, cudaStream_t stream) {
    if (head_dim % 2 || n_tokens < 1) {
        fprintf(stderr, "error: rope_table_gpu: head_dim %d is odd or no tokens (%d)\n", head_dim, n_tokens);
        exit(1);
    }
    const int pairs = n_tokens * head_dim / 2;
    rope_table_kernel<<<(pairs + 255) / 256, 256, 0, stream>>>((float2*)table, pos0, n_tokens, head_dim, theta);
    CUDA_CHECK(cudaGetLastError());
}
