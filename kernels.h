// kernels.h: the CUDA launchers that run.c calls, one per operation. Every pointer is device
// memory; every launcher is asynchronous on `stream` and checks its own launch. Activations are
// float32, except the prefill inputs of matrix products (matmul_input_dtype); weights are stored in the checkpoint's dtype (DT_*), the KV cache in bf16 or fp16.
// DT_INT8 weights (Q8_0): int8 values, and beside them `scales`, one fp16 scale per 32 consecutive
// weights of a row, (rows, cols / 32); weight = value * scale. cols % 32 == 0, the int8 rows
// 16-byte aligned. For the other dtypes the scales pointer is ignored (NULL).
#pragma once
#include <stdio.h>
#include <stdlib.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_INT8 = 3 };  // same codes as the checkpoint header

#define CUDA_CHECK(call) do { cudaError_t e_ = (call); if (e_ != cudaSuccess) { \
    fprintf(stderr, "error: CUDA: %s (%s:%d)\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
    exit(1); } } while (0)

// rmsnorm.cu: out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, for n rows of dim values;
// out of out_dtype: DT_F32 (decode), or matmul_input_dtype() (prefill: rounded once, here)
void rmsnorm_gpu(void* out, int out_dtype, const float* x, const float* weight, int n, int dim, float eps,
                 cudaStream_t stream);

// rope.cu: per-head q_norm/k_norm (skipped when the norm pointers are NULL, as in Qwen2) then
// NeoX RoPE at position *pos, in place on q (n_heads, head_dim) and k (n_kv_heads, head_dim);
// then k / k_scale and v are stored to the caches at row *pos, (seq_len, n_kv_heads, head_dim).
void qk_norm_rope_gpu(float* q, float* k, const float* v, const float* q_norm, const float* k_norm,
                      float k_scale, void* k_cache, void* v_cache, int kv_dtype, const int* pos,
                      int n_heads, int n_kv_heads, int head_dim, float theta, float eps,
                      cudaStream_t stream);

// matvec.cu: out[r] (+)= dot(w[r], x) + bias[r] for r < rows; w is (rows, cols) of wdtype (its
// scales: int8); bias may be NULL; accumulate adds into out (the residual add).
void matvec_gpu(float* out, const void* w, const void* scales, int wdtype, const float* x,
                const float* bias, int rows, int cols, int accumulate, cudaStream_t stream);
// h[i] = silu(dot(w[i], x)) * dot(w[hidden + i], x): the gate rows then the up rows of w_gate_up
// (2 hidden, dim)
void swiglu_matvec_gpu(float* h, const void* w_gate_up, const void* scales, int wdtype, const float* x,
                       int hidden, int dim, cudaStream_t stream);
// x (n, dim) = embedding rows tokens[0..n)
void embed_gpu(float* x, const void* embedding, const void* scales, int wdtype, const int* tokens, int n,
               int dim, cudaStream_t stream);
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

// decode.cu: one decode step, every layer then the LM head and its argmax, as one persistent kernel
// (the chain of the launchers above computes the same function). The stacked tensors are the
// checkpoint's (README's table), on the device.
typedef struct {
    // weights: the stacked tensors, and for int8 each one's scales (same leading shape, last dim / 32;
    // NULL otherwise)
    const void* embedding;  // (vocab_size, dim), wdtype
    const float* rms_att;   // (n_layers, dim)
    const float* rms_ffn;   // (n_layers, dim)
    const float* q_norm;    // (n_layers, head_dim) or NULL
    const float* k_norm;    // (n_layers, head_dim) or NULL
    const float* k_scale;   // (n_layers), or NULL for 1: the cache holds k / k_scale
    const float* bqkv;      // (n_layers, qkv_dim) or NULL
    const void* wqkv;       // (n_layers, qkv_dim, dim), wdtype: q rows, then k, then v
    const void* wo;         // (n_layers, dim, q_dim)
    const void* w_gate_up;  // (n_layers, 2*hidden_dim, dim): gate rows, then up
    const void* w_down;     // (n_layers, dim, hidden_dim)
    const float* rms_final; // (dim)
    const void* lm_head;    // (vocab_size, dim)
    const void *embedding_scales, *wqkv_scales, *wo_scales, *w_gate_up_scales, *w_down_scales, *lm_head_scales;
    void* k_cache;          // (n_layers, seq_len, n_kv_heads, head_dim), kv_dtype
    void* v_cache;          // (n_layers, seq_len, n_kv_heads, head_dim), kv_dtype
    float* logits;          // (vocab_size)
    // what the kernel's blocks pass each other: decode_published_words() (value, flag) words, zero
    // before the first step, and a counter, zero before the first step (a step leaves it zero)
    unsigned long long* published;
    unsigned* blocks_done;
    unsigned epoch;         // the number of the step, decode_step_gpu's: zero before the first
    int* io;                // (3) a step leaves (argmax, its position + 1, argmax): the next greedy step's input
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, seq_len, wdtype, kv_dtype;
    float theta, eps;
} DecodeStep;
size_t decode_published_words(const DecodeStep* step);
// The bytes of each of the kernel's weight stages for this shape; 0 if the shape does not fit the kernel.
int decode_step_stage_bytes(const DecodeStep* step);
// One step for `token` at `pos`, or with token < 0 for io's token and position (the step before's
// argmax: greedy decoding enqueues the next step before the host has read this one's). The argmax
// (-1 if a logit is NaN or inf) goes to *result (host-mapped memory, read after the step) and io.
// The step's blocks wait for each other: one step at a time, on one stream.
void decode_step_gpu(DecodeStep* step, int token, int pos, int* result, cudaStream_t stream);

// ---- prefill: T = n_tokens prompt tokens at once, matrix products on the tensor cores ----
// The activations a matrix product reads (the normed x, the attention output, the SwiGLU product)
// are stored in the type its tensor cores take, so that they are rounded once, where they are made:
// bf16 for bf16 and int8 weights, fp16 for fp16, fp32 for fp32 (which run on the CUDA cores).
static inline int matmul_input_dtype(int wdtype) {
    return wdtype == DT_F32 ? DT_F32 : wdtype == DT_F16 ? DT_F16 : DT_BF16;
}
// matmul.cu: out (n_tokens, rows) (+)= x (n_tokens, cols) . w (rows, cols)^T + bias (rows, or NULL),
// x of matmul_input_dtype(wdtype), fp32 accumulation. bf16/fp16 w: the tensor cores, fed by the copy
// engine (TMA); int8 w: dequantized to bf16 on its way to the tensor cores; fp32 w: CUDA cores. rows
// and cols multiples of 8 (int8: cols of 32), w and x 16-byte aligned; accumulate adds into out.
void matmul_gpu(float* out, const void* w, const void* scales, int wdtype, const void* x, const float* bias,
                int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream);
// The same product on the simple tensor-core kernel (cp.async, no warp specialization; fp32 w: CUDA
// cores as above): the reference the fast one is tested against, and run.c's path with -a 0.
void matmul_simple_gpu(float* out, const void* w, const void* scales, int wdtype, const void* x, const float* bias,
                       int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream);
// nll[t] = logsumexp(l_t) - l_t[targets[t]] for the logits l_t = w . x[t] (vocab of them per token)
// without storing them: each tile of the product keeps per token row the max, the sum of
// exponentials and the target's logit, and a second kernel merges the tiles. NaN where a target is
// outside [0, vocab) or a logit is NaN or +inf. w of dtype bf16, fp16 or int8 (fp32: compute the
// logits with matmul_gpu and cross_entropy_gpu). scratch: lm_head_loss_scratch_floats() floats.
size_t lm_head_loss_scratch_floats(int n_tokens, int vocab);
void lm_head_loss_gpu(float* nll, const void* w, const void* scales, int wdtype, const void* x, const int* targets,
                      int n_tokens, int vocab, int dim, float* scratch, int simple, cudaStream_t stream);
// h (n_tokens, hidden) of h_dtype = silu(gate_up[:, :hidden]) * gate_up[:, hidden:], gate_up
// (n_tokens, 2*hidden) fp32; hidden % 4 == 0.
void swiglu_gpu(void* h, int h_dtype, const float* gate_up, int n_tokens, int hidden, cudaStream_t stream);
// The MLP's first half: h (n_tokens, hidden) of matmul_input_dtype(wdtype) = silu(x . gate^T) * (x . up^T),
// w_gate_up (2*hidden, dim): gate rows, then up. bf16/fp16 w (and not simple): one TMA product with
// SwiGLU in its epilogue; otherwise matmul (simple or not) into gate_up (n_tokens, 2*hidden) fp32 and
// swiglu_gpu.
void swiglu_matmul_gpu(void* h, const void* w_gate_up, const void* scales, int wdtype, const void* x, int n_tokens,
                       int hidden, int dim, float* gate_up, int simple, cudaStream_t stream);

// rope.cu, attention.cu: qkv (n_tokens, (n_heads + 2*n_kv_heads) * head_dim), rows [q | k | v].
// Per-head q_norm/k_norm (skipped when NULL) then NeoX RoPE at position pos0 + t, in place on q and k;
// q is also stored to q_out (n_tokens, n_heads * head_dim) of kv_dtype (the type attention reads it in),
// k / k_scale and v to cache rows pos0 .. pos0 + n_tokens - 1.
void qk_norm_rope_batch_gpu(void* q_out, float* qkv, const float* q_norm, const float* k_norm, float k_scale,
                            void* k_cache, void* v_cache, int kv_dtype, int pos0, int n_tokens,
                            int n_heads, int n_kv_heads, int head_dim, float theta, float eps,
                            cudaStream_t stream);
// rope.cu: table (n_tokens, head_dim / 2, 2) = (cos, sin) of RoPE's angle (pos0 + t) * inv_freq[i], as
// qk_norm_rope_batch_gpu computes it: what the fused qkv product below rotates with.
void rope_table_gpu(float* table, int pos0, int n_tokens, int head_dim, float theta, cudaStream_t stream);
// matmul.cu: the attention's inputs from x (n_tokens, dim) of matmul_input_dtype(wdtype): qkv = x . wqkv^T
// + bias (qkv_dim = (n_heads + 2*n_kv_heads) * head_dim rows, bias NULL or (qkv_dim)), then
// qk_norm_rope_batch_gpu's function: q to q_out (kv_dtype), k and v to the caches. Not simple, 16-bit or
// int8 w, head_dim 64 or 128: one tensor-core product with the norms, RoPE (from `rope`, rope_table_gpu's
// table of these positions, 16-byte aligned) and the stores in its epilogue; otherwise matmul (simple or
// not) into qkv (n_tokens, qkv_dim) fp32 and qk_norm_rope_batch_gpu (which ignores `rope`).
void qkv_rope_matmul_gpu(void* q_out, const void* wqkv, const void* scales, int wdtype, const void* x,
                         const float* bias, const float* q_norm, const float* k_norm, float k_scale, void* k_cache,
                         void* v_cache, int kv_dtype, const float* rope, int pos0, int n_tokens, int n_heads,
                         int n_kv_heads, int head_dim, int dim, float theta, float eps, float* qkv, int simple,
                         cudaStream_t stream);
// out (n_tokens, n_heads * head_dim) of out_dtype = causal softmax(q . K^T * scale) V: query t (q_out
// above: (n_tokens, n_heads * head_dim) of kv_dtype) attends cache rows 0 .. pos0 + t; query head h reads
// KV head h / (n_heads / n_kv_heads). scale = k_scale / sqrt(head_dim). head_dim even, <= 256; 64 and 128
// run on the tensor cores (flash attention), others on a simple CUDA-core kernel.
void attention_prefill_gpu(void* out, int out_dtype, const void* q, const void* k_cache, const void* v_cache,
                           int kv_dtype, int pos0, int n_tokens, int n_heads, int n_kv_heads,
                           int head_dim, float scale, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
