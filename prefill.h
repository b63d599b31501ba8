// prefill.h: the batched launchers for prefill and perplexity, T = n_tokens prompt tokens at once,
// matrix products and attention on the tensor cores. Same conventions as kernels.h: device
// pointers, fp32 activations, weights in DT_*, KV cache (seq_len, n_kv_heads, head_dim) in bf16 or
// fp16, asynchronous on `stream`, every launch checked.
#pragma once
#include "kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

// matmul.cu: out (n_tokens, rows) (+)= x (n_tokens, cols) . w (rows, cols)^T + bias (rows, or NULL).
// bf16/fp16 w: tensor cores, x rounded to w's type, fp32 accumulation; fp32 w: CUDA cores.
// rows and cols multiples of 8, w and x 16-byte aligned; accumulate adds into out (residual add).
void matmul_gpu(float* out, const void* w, int wdtype, const float* x, const float* bias,
                int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream);
// h (n_tokens, hidden) = silu(gate_up[:, :hidden]) * gate_up[:, hidden:], gate_up (n_tokens, 2*hidden);
// hidden % 4 == 0.
void swiglu_gpu(float* h, const float* gate_up, int n_tokens, int hidden, cudaStream_t stream);

// prefill_attention.cu: qkv (n_tokens, (n_heads + 2*n_kv_heads) * head_dim), rows [q | k | v].
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
