// kernels.h: the CUDA launchers that run.c calls, one per operation. Every pointer is device
// memory; every launcher is asynchronous on `stream` and checks its own launch. Activations are
// float32; weights are stored in the checkpoint's dtype (DT_*), the KV cache in bf16 or fp16.
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };  // same codes as the checkpoint header

#define CUDA_CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "error: CUDA: %s (%s:%d)\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
    exit(1); } } while (0)

// rmsnorm.cu: out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, for n rows of dim values
void rmsnorm_gpu(float* out, const float* x, const float* weight, int n, int dim, float eps,
                 cudaStream_t stream);

// rope.cu: per-head q_norm/k_norm (skipped when the norm pointers are NULL, as in Qwen2) then
// NeoX RoPE at position *pos, in place on q (n_heads, head_dim) and k (n_kv_heads, head_dim);
// then k / k_scale and v are stored to the caches at row *pos, (seq_len, n_kv_heads, head_dim).
void qk_norm_rope_gpu(float* q, float* k, const float* v, const float* q_norm, const float* k_norm,
                      float k_scale, void* k_cache, void* v_cache, int kv_dtype, const int* pos,
                      int n_heads, int n_kv_heads, int head_dim, float theta, float eps,
                      cudaStream_t stream);

// matvec.cu: out[r] (+)= dot(w[r], x) + bias[r] for r < rows; w is (rows, cols) of wdtype;
// bias may be NULL; accumulate adds into out (the residual add).
void matvec_gpu(float* out, const void* w, int wdtype, const float* x, const float* bias,
                int rows, int cols, int accumulate, cudaStream_t stream);
// h[i] = silu(dot(w[i], x)) * dot(w[hidden + i], x): the gate rows then the up rows of w_gate_up
void swiglu_matvec_gpu(float* h, const void* w_gate_up, int wdtype, const float* x,
                       int hidden, int dim, cudaStream_t stream);
// x (n, dim) = embedding rows tokens[0..n)
void embed_gpu(float* x, const void* embedding, int wdtype, const int* tokens, int n, int dim,
               cudaStream_t stream);
// *out = argmax(logits[0..n)), the lowest index on ties; -1 if any logit is NaN or +-inf (the
// caller reports it: the model diverged). n >= 1. Uses module scratch: one stream at a time.
void argmax_gpu(int* out, const float* logits, int n, cudaStream_t stream);
// nll[t] = logsumexp(logits[t]) - logits[t][targets[t]], for n rows of vocab logits; NaN for a row
// whose target is outside [0, vocab) or whose logits hold a NaN or +inf.
void cross_entropy_gpu(float* nll, const float* logits, const int* targets, int n, int vocab,
                       cudaStream_t stream);

// attention.cu, unfused: out (n_heads, head_dim) = softmax(q . K^T * scale) V over cache rows
// 0..*pos, query head h reading KV head h / (n_heads / n_kv_heads). scale = k_scale / sqrt(hd).
// scratch holds the flash-decoding partials: attention_scratch_floats() floats.
size_t attention_scratch_floats(int n_heads, int head_dim, int seq_len);
void attention_gpu(float* out, const float* q, const void* k_cache, const void* v_cache,
                   int kv_dtype, const int* pos, int n_heads, int n_kv_heads, int head_dim,
                   int seq_len, float scale, float* scratch, cudaStream_t stream);

// attention.cu, fused: the whole attention half of a layer in one kernel,
// x += o_proj(attention(rope(qk_norm(qkv(rmsnorm(x))))))
typedef struct {
    float* x;               // (dim) residual stream, updated in place
    const float* rms_att;   // (dim)
    const void* wqkv;       // (n_heads*head_dim + 2*n_kv_heads*head_dim, dim), wdtype
    const float* bqkv;      // (n_heads*head_dim + 2*n_kv_heads*head_dim) or NULL
    const float* q_norm;    // (head_dim) or NULL
    const float* k_norm;    // (head_dim) or NULL
    float k_scale;          // K is cached as k / k_scale
    const void* wo;         // (dim, n_heads*head_dim), wdtype
    void* k_cache;          // (seq_len, n_kv_heads, head_dim), kv_dtype
    void* v_cache;          // (seq_len, n_kv_heads, head_dim), kv_dtype
    const int* pos;         // position of the token being decoded
    float* qkv;             // scratch (n_heads*head_dim + 2*n_kv_heads*head_dim)
    float* att;             // scratch (n_heads*head_dim)
    float* scratch;         // attention_scratch_floats() floats
    int dim, n_heads, n_kv_heads, head_dim, seq_len, wdtype, kv_dtype;
    float theta, eps;
} AttentionLayer;
void attention_fused_gpu(const AttentionLayer* layer, cudaStream_t stream);

// ---- prefill: T = n_tokens prompt tokens at once, matrix products on the tensor cores ----
// matmul.cu: out (n_tokens, rows) (+)= x (n_tokens, cols) . w (rows, cols)^T + bias (rows, or NULL).
// bf16/fp16 w: tensor cores, x rounded to w's type, fp32 accumulation; fp32 w: CUDA cores.
// rows and cols multiples of 8, w and x 16-byte aligned; accumulate adds into out (residual add).
void matmul_gpu(float* out, const void* w, int wdtype, const float* x, const float* bias,
                int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream);
// h (n_tokens, hidden) = silu(gate_up[:, :hidden]) * gate_up[:, hidden:], gate_up (n_tokens, 2*hidden);
// hidden % 4 == 0.
void swiglu_gpu(float* h, const float* gate_up, int n_tokens, int hidden, cudaStream_t stream);

// rope.cu, attention.cu: qkv (n_tokens, (n_heads + 2*n_kv_heads) * head_dim), rows [q | k | v].
// Per-head q_norm/k_norm (skipped when NULL) then NeoX RoPE at position pos0 + t, in place on q and
// k; k / k_scale and v stored to cache rows pos0 .. pos0 + n_tokens - 1.
void qk_norm_rope_batch_gpu(float* qkv, const float* q_norm, const float* k_norm, float k_scale,
                            void* k_cache, void* v_cache, int kv_dtype, int pos0, int n_tokens,
                            int n_heads, int n_kv_heads, int head_dim, float theta, float eps,
                            cudaStream_t stream);
// out (n_tokens, n_heads * head_dim) = causal softmax(q . K^T * scale) V: query t (q from qkv rows,
// rounded to kv_dtype) attends cache rows 0 .. pos0 + t; query head h reads KV head
// h / (n_heads / n_kv_heads). scale = k_scale / sqrt(head_dim). head_dim even, <= 256; 64 and 128
// run on the tensor cores (flash attention), others on a simple CUDA-core kernel.
void attention_prefill_gpu(float* out, const float* qkv, const void* k_cache, const void* v_cache,
                           int kv_dtype, int pos0, int n_tokens, int n_heads, int n_kv_heads,
                           int head_dim, float scale, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
