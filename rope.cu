// rope.cu: per-head q_norm/k_norm, NeoX RoPE at position *pos, and the K/V cache store.
// The math lives in common.cuh (qk_norm_rope_head), shared with the fused attention kernel.
#include "common.cuh"

constexpr int ROPE_WARPS = 4;  // heads per block, one warp each

// q (n_heads, hd) and k (n_kv_heads, hd) in place; v (n_kv_heads, hd);
// caches (seq_len, n_kv_heads, hd) of KV, written at row *pos.
template <typename KV>
__global__ void qk_norm_rope_kernel(float* q, float* k, const float* v, const float* q_norm,
                                    const float* k_norm, float k_scale, KV* k_cache, KV* v_cache,
                                    const int* pos, int n_heads, int n_kv_heads, int head_dim,
                                    float theta, float eps) {
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
        qk_norm_rope_kernel<__nv_bfloat16><<<blocks, 32 * ROPE_WARPS, 0, stream>>>(
            q, k, v, q_norm, k_norm, k_scale, (__nv_bfloat16*)k_cache, (__nv_bfloat16*)v_cache, pos,
            n_heads, n_kv_heads, head_dim, theta, eps);
    } else if (kv_dtype == DT_F16) {
        qk_norm_rope_kernel<__half><<<blocks, 32 * ROPE_WARPS, 0, stream>>>(
            q, k, v, q_norm, k_norm, k_scale, (__half*)k_cache, (__half*)v_cache, pos, n_heads,
            n_kv_heads, head_dim, theta, eps);
    } else {
        fprintf(stderr, "error: qk_norm_rope_gpu: KV cache dtype %d is not bf16 or fp16\n", kv_dtype);
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}
