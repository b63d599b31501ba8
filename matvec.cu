// matvec.cu: weight-streaming matrix-vector products (one warp per output row), the embedding
// lookup, and the reductions over logits (argmax, cross entropy). Decoding one token is bound by
// reading the weights once, so every matvec here is written around 16-byte coalesced weight loads
// with several in flight per lane.
#include <float.h>
#include <limits.h>
#include "common.cuh"

constexpr int MATVEC_WARPS = 8;  // rows per block; 151936 LM-head rows -> 18992 blocks on 132 SMs

// out (rows) (+)= w (rows, cols) . x (cols) + bias (rows, or NULL); scales (rows, cols / Q8_BLOCK): int8's
template <typename W>
__global__ void matvec_kernel(float* out, const W* w, const __half* scales, const float* x, const float* bias,
                              int rows, int cols, int accumulate, bool vec) {
    griddep_wait();
    const int row = blockIdx.x * MATVEC_WARPS + threadIdx.x / 32;
    if (row >= rows) return;
    const W* row_ptr[1] = {w + (size_t)row * cols};
    const __half* row_scales[1] = {scales + (size_t)row * cols / Q8_BLOCK};
    float dot[1];
    warp_dot_rows<W, 1>(dot, row_ptr, x, cols, vec, 1, row_scales);
    if (threadIdx.x % 32 == 0) {
        const float b = bias ? bias[row] : 0.f;
        out[row] = accumulate ? out[row] + dot[0] + b : dot[0] + b;
    }
}

// h (hidden) = silu(gate . x) * (up . x); w_gate_up (2*hidden, dim): gate rows, then up rows (and
// their scales: int8). One warp reads its gate row and its up row together.
template <typename W>
__global__ void swiglu_matvec_kernel(float* h, const W* w_gate_up, const __half* scales, const float* x, int hidden,
                                     int dim, bool vec) {
    griddep_wait();
    const int i = blockIdx.x * MATVEC_WARPS + threadIdx.x / 32;
    if (i >= hidden) return;
    const W* row_ptr[2] = {w_gate_up + (size_t)i * dim, w_gate_up + ((size_t)hidden + i) * dim};
    const __half* row_scales[2] = {scales + (size_t)i * dim / Q8_BLOCK, scales + ((size_t)hidden + i) * dim / Q8_BLOCK};
    float dot[2];
    warp_dot_rows<W, 2>(dot, row_ptr, x, dim, vec, 2, row_scales);
    if (threadIdx.x % 32 == 0) h[i] = dot[0] / (1.f + expf(-dot[0])) * dot[1];
}

// x (n, dim) = embedding (vocab, dim) rows tokens[0..n); grid (dim blocks, n)
template <typename W>
__global__ void embed_kernel(float* x, const W* embedding, const __half* scales, const int* tokens, int dim) {
    griddep_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < dim) x[(size_t)blockIdx.y * dim + i] = weight_at(embedding, scales, (size_t)tokens[blockIdx.y] * dim + i);
}

// argmax in two passes (common.cuh): ARGMAX_BLOCKS block maxima into these buffers, then one block
// over them; -1 if a logit is NaN or +-inf. The buffers are module state: argmax calls must not run
// concurrently on different streams.
constexpr int ARGMAX_BLOCKS = 264, ARGMAX_THREADS = 1024;
__device__ float argmax_block_value[ARGMAX_BLOCKS];
__device__ int argmax_block_index[ARGMAX_BLOCKS];
__device__ bool argmax_block_nonfinite[ARGMAX_BLOCKS];

__global__ void argmax_blocks_kernel(const float* logits, int n) {
    griddep_wait();
    float v = -INFINITY;
    int idx = INT_MAX;  // loses every tie with a real index
    bool nonfinite = false;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float x = logits[i];
        nonfinite |= !isfinite(x);
        if (argmax_better(x, i, v, idx)) { v = x; idx = i; }
    }
    store_block_argmax({argmax_block_value, argmax_block_index, argmax_block_nonfinite}, v, idx, nonfinite);
}

__global__ void argmax_final_kernel(int* out, int n_blocks) {
    griddep_wait();
    const int result = reduce_block_argmax({argmax_block_value, argmax_block_index, argmax_block_nonfinite}, n_blocks);
    if (threadIdx.x == 0) *out = result;
}

// nll[t] = logsumexp(logits[t]) - logits[t][targets[t]]: one block per row, max then sum, in fp32
// (the sum over up to 151936 terms each <= 1 is exact enough: relative 1e-7 per term). A target
// outside [0, vocab) gives NaN for its row rather than a read out of bounds; a NaN or +inf logit
// makes the row NaN through the sum.
constexpr int CE_THREADS = 1024;
__global__ void cross_entropy_kernel(float* nll, const float* logits, const int* targets, int vocab) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) max = fmaxf(max, row[i]);
    max = block_max(max);
    float sum = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(row[i] - max);
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const int target = targets[blockIdx.x];
        nll[blockIdx.x] = target >= 0 && target < vocab ? max + logf(sum) - row[target] : NAN;
    }
}

// ---- launchers ------------------------------------------------------------------------------------

static void check_wdtype(int wdtype, const char* who) {
    if (wdtype != DT_F32 && wdtype != DT_BF16 && wdtype != DT_F16 && wdtype != DT_INT8) {
        fprintf(stderr, "error: %s: unknown weight dtype %d\n", who, wdtype);
        exit(1);
    }
}

// The vector path (warp_dot_rows); int8 has no other: its rows must be whole blocks, 16-byte aligned.
static bool vector_path(int wdtype, int cols, const void* w, const void* scales, const float* x, const char* who) {
    const bool vec = cols % 8 == 0 && aligned16(w) && aligned16(x);
    if (wdtype == DT_INT8 && (!vec || cols % Q8_BLOCK || !scales)) {
        fprintf(stderr, "error: %s: int8 weights need cols %% %d == 0 (got %d), scales, 16-byte aligned w and x\n",
                who, Q8_BLOCK, cols);
        exit(1);
    }
    return vec;
}

extern "C" void matvec_gpu(float* out, const void* w, const void* scales, int wdtype, const float* x,
                           const float* bias, int rows, int cols, int accumulate, cudaStream_t stream) {
    check_wdtype(wdtype, "matvec_gpu");
    const int blocks = (rows + MATVEC_WARPS - 1) / MATVEC_WARPS, threads = 32 * MATVEC_WARPS;
    const bool vec = vector_path(wdtype, cols, w, scales, x, "matvec_gpu");
    DISPATCH_W(wdtype, launch_pdl(matvec_kernel<W>, blocks, threads, 0, stream, out, (const W*)w,
                                  (const __half*)scales, x, bias, rows, cols, accumulate, vec));
}

extern "C" void swiglu_matvec_gpu(float* h, const void* w_gate_up, const void* scales, int wdtype, const float* x,
                                  int hidden, int dim, cudaStream_t stream) {
    check_wdtype(wdtype, "swiglu_matvec_gpu");
    const int blocks = (hidden + MATVEC_WARPS - 1) / MATVEC_WARPS, threads = 32 * MATVEC_WARPS;
    const bool vec = vector_path(wdtype, dim, w_gate_up, scales, x, "swiglu_matvec_gpu");
    DISPATCH_W(wdtype, launch_pdl(swiglu_matvec_kernel<W>, blocks, threads, 0, stream, h, (const W*)w_gate_up,
                                  (const __half*)scales, x, hidden, dim, vec));
}

extern "C" void embed_gpu(float* x, const void* embedding, const void* scales, int wdtype, const int* tokens, int n,
                          int dim, cudaStream_t stream) {
    check_wdtype(wdtype, "embed_gpu");
    if (wdtype == DT_INT8 && (dim % Q8_BLOCK || !scales)) {
        fprintf(stderr, "error: embed_gpu: int8 weights need dim %% %d == 0 (got %d) and scales\n", Q8_BLOCK, dim);
        exit(1);
    }
    const dim3 grid((dim + 255) / 256, n);
    DISPATCH_W(wdtype, launch_pdl(embed_kernel<W>, grid, 256, 0, stream, x, (const W*)embedding,
                                  (const __half*)scales, tokens, dim));
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void argmax_gpu(int* out, const float* logits, int n, cudaStream_t stream) {
    if (n < 1) {
        fprintf(stderr, "error: argmax_gpu: %d logits\n", n);
        exit(1);
    }
    int blocks = (n + ARGMAX_THREADS - 1) / ARGMAX_THREADS;
    blocks = blocks < 1 ? 1 : blocks > ARGMAX_BLOCKS ? ARGMAX_BLOCKS : blocks;
    launch_pdl(argmax_blocks_kernel, blocks, ARGMAX_THREADS, 0, stream, logits, n);
    CUDA_CHECK(cudaGetLastError());
    launch_pdl(argmax_final_kernel, 1, ARGMAX_THREADS, 0, stream, out, blocks);
    CUDA_CHECK(cudaGetLastError());
}

extern "C" void cross_entropy_gpu(float* nll, const float* logits, const int* targets, int n, int vocab,
                                  cudaStream_t stream) {
    cross_entropy_kernel<<<n, CE_THREADS, 0, stream>>>(nll, logits, targets, vocab);
    CUDA_CHECK(cudaGetLastError());
}
