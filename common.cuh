// common.cuh: device helpers shared by the kernels of rmsnorm.cu, rope.cu, matvec.cu and
// attention.cu, so that the fused attention kernel runs exactly the math of the unfused chain.
#pragma once
#include <limits.h>
#include <stdint.h>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "kernels.h"

// ---- programmatic dependent launch ----------------------------------------------------------------

// Decode runs ~200 small kernels per token, and between two of them the GPU idles a few us while
// the next grid launches. Launched with launch_pdl, a kernel may start as soon as every block of
// the one before it has started; it then waits in griddep_wait(), its first statement, until that
// kernel has finished and its writes are visible. So the launch overlaps the previous kernel's
// tail while the order of memory accesses stays that of plain stream order. (Both instructions
// are no-ops for a kernel launched without the attribute.)
__device__ __forceinline__ void griddep_wait() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
}

template <typename... Params, typename... Args>
void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
    cudaLaunchAttribute attribute;
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {grid, block, smem, stream, &attribute, 1};
    CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

// ---- shared-memory barriers for the copy engine ---------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// An mbarrier completes a phase when `count` threads have arrived and the bytes they announced
// (expect_tx) have landed; waiting on parity P returns once the phase of parity P has completed (on a
// fresh barrier, parity 1 counts as completed: the phase "before" the first).
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}
// after the inits, before the barrier that publishes them: visible to the copy engine too
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
    uint32_t done;
    do {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
}

// ---- element types ------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float(float v) { return v; }

// Host: DISPATCH_ACT(dtype, who, body) runs body with A the element type of an activation buffer of
// dtype DT_F32, DT_BF16 or DT_F16 (kernels.h: matmul_input_dtype); for any other, `who` reports an error.
#define DISPATCH_ACT(DTYPE, WHO, BODY)                                                             \
    switch (DTYPE) {                                                                              \
        case DT_F32: { using A = float; BODY; } break;                                            \
        case DT_BF16: { using A = __nv_bfloat16; BODY; } break;                                   \
        case DT_F16: { using A = __half; BODY; } break;                                           \
        default: fprintf(stderr, "error: %s: activation dtype %d is not fp32, bf16 or fp16\n", WHO, (int)(DTYPE)); exit(1); \
    }

// Weights of dtype DT_INT8 are int8_t, each block of Q8_BLOCK consecutive weights of a row scaled by
// one fp16 scale (kernels.h): weight = value * scale.
constexpr int Q8_BLOCK = 32;
template <typename W> constexpr bool is_int8 = std::is_same_v<W, int8_t>;

// Element i of a weight matrix as float (int8: times its block's scale; scales unused otherwise).
template <typename W>
__device__ __forceinline__ float weight_at(const W* w, const __half* scales, size_t i) {
    if constexpr (is_int8<W>) return (float)w[i] * __half2float(scales[i / Q8_BLOCK]);
    else return to_float(w[i]);
}

// Host: DISPATCH_W(wdtype, body) runs body with W the element type of the weight dtype (DT_*; int8
// for any other: the launchers check wdtype first).
#define DISPATCH_W(WDTYPE, BODY)                                          \
    switch (WDTYPE) {                                                     \
        case DT_F32: { using W = float; BODY; } break;                    \
        case DT_BF16: { using W = __nv_bfloat16; BODY; } break;           \
        case DT_F16: { using W = __half; BODY; } break;                   \
        default: { using W = int8_t; BODY; } break;                       \
    }

// 8 consecutive elements of a row: bf16/fp16 in one 16-byte load, fp32 in two, int8 in one 8-byte
// load. (int8 in 16-byte loads of 16 would need each lane's 16 x values, 64 bytes, per load: lanes
// 64 bytes apart collide in the shared-memory banks and double the L1 traffic of x per weight, and
// measured slower than bf16: 622 against 799 tok/s on the 0.6B shape.)
template <typename T> struct Pack { uint4 bits; };
template <> struct Pack<float> { float4 lo, hi; };
template <> struct Pack<int8_t> { uint2 bits; };

// Three ways to read memory. Weights are read-only for every kernel and go through the
// non-coherent read-only path (VIA_NC: __ldg, ld.global.nc). That path is defined only for memory
// that no thread writes while the kernel runs: the per-SM cache behind it is not kept coherent with
// writes, so it may return what a line held before another block's store. Data that one block of a
// launch writes and another reads (the KV cache row and the activations in the persistent decode
// kernel, decode.cu) is read VIA_L2: __ldcg (ld.global.cg) caches in L2 only, which is the point of
// coherence for global memory, and sees every write ordered before the read by a fence and a flag.
// VIA_PLAIN is an ordinary load, for shared memory.
enum Via { VIA_NC, VIA_L2, VIA_PLAIN };
template <Via VIA, typename V>
__device__ __forceinline__ V load16(const V* p) { return VIA == VIA_NC ? __ldg(p) : VIA == VIA_L2 ? __ldcg(p) : *p; }

template <typename T, Via VIA = VIA_NC>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {  // p aligned to the pack's size
    Pack<T> r;
    if constexpr (sizeof(T) == 4) {
        r.lo = load16<VIA>(reinterpret_cast<const float4*>(p));
        r.hi = load16<VIA>(reinterpret_cast<const float4*>(p) + 1);
    } else if constexpr (sizeof(T) == 1) {
        r.bits = load16<VIA>(reinterpret_cast<const uint2*>(p));
    } else {
        r.bits = load16<VIA>(reinterpret_cast<const uint4*>(p));
    }
    return r;
}
template <typename T> __device__ __forceinline__ Pack<T> zero_pack() { Pack<T> r; r.bits = make_uint4(0, 0, 0, 0); return r; }
template <> __device__ __forceinline__ Pack<float> zero_pack() {
    Pack<float> r; r.lo = r.hi = make_float4(0.f, 0.f, 0.f, 0.f); return r;
}
template <> __device__ __forceinline__ Pack<int8_t> zero_pack() { Pack<int8_t> r; r.bits = make_uint2(0, 0); return r; }

__device__ __forceinline__ void unpack(const Pack<float>& p, float f[8]) {
    f[0] = p.lo.x; f[1] = p.lo.y; f[2] = p.lo.z; f[3] = p.lo.w;
    f[4] = p.hi.x; f[5] = p.hi.y; f[6] = p.hi.z; f[7] = p.hi.w;
}
__device__ __forceinline__ void unpack(const Pack<__nv_bfloat16>& p, float f[8]) {
    const uint32_t w[4] = {p.bits.x, p.bits.y, p.bits.z, p.bits.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {  // bf16 is the top half of an fp32: a shift or a mask converts it
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack(const Pack<__half>& p, float f[8]) {
    const uint32_t w[4] = {p.bits.x, p.bits.y, p.bits.z, p.bits.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}
// Four int8 (a 32-bit word) to float, exactly and without conversion instructions (a decode step
// converts ~13 int8 weights per SM per clock, near the 16 conversions per clock an SM issues): the
// byte plus 128 becomes the low mantissa bits of 2^23, and subtracting 2^23 + 128 leaves the value.
__device__ __forceinline__ void int8x4_to_float(uint32_t w, float f[4]) {
    const uint32_t biased = w ^ 0x80808080u;  // each byte b -> b + 128, as unsigned
#pragma unroll
    for (int b = 0; b < 4; b++) f[b] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440 | b)) - 8388736.f;
}
__device__ __forceinline__ void unpack(const Pack<int8_t>& p, float f[8]) {
    int8x4_to_float(p.bits.x, f);
    int8x4_to_float(p.bits.y, f + 4);
}

// ---- reductions ---------------------------------------------------------------------------------

struct SumOp { __device__ float operator()(float a, float b) const { return a + b; } };
struct MaxOp { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };

// op (associative, commutative) over the 32 lanes of a warp; every lane gets the result.
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp()); }

// op over the block (blockDim.x a multiple of 32); every thread gets the result. Safe to call
// repeatedly: the trailing barrier keeps the next call from overwriting partials still being read.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op) {
    __shared__ float warp_partials[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    v = warp_reduce(v, op);
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    float total = warp_partials[0];
    for (int w = 1; w < n_warps; w++) total = op(total, warp_partials[w]);
    __syncthreads();
    return total;
}
__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, SumOp()); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, MaxOp()); }

// (value, index) pairs ordered as torch.argmax picks: the larger value, the lower index on ties.
__device__ __forceinline__ bool argmax_better(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// Block-wide (value, index) max, lowest index on ties; the result is valid in thread 0.
__device__ __forceinline__ void block_argmax(float& v, int& idx) {
    __shared__ float values[32];
    __shared__ int indices[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float vo = __shfl_xor_sync(0xffffffffu, v, o);
        const int io = __shfl_xor_sync(0xffffffffu, idx, o);
        if (argmax_better(vo, io, v, idx)) { v = vo; idx = io; }
    }
    if (threadIdx.x % 32 == 0) { values[threadIdx.x / 32] = v; indices[threadIdx.x / 32] = idx; }
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < blockDim.x / 32; w++)
            if (argmax_better(values[w], indices[w], v, idx)) { v = values[w]; idx = indices[w]; }
    __syncthreads();  // a second call may overwrite values[] only after thread 0 read them
}

// The argmax of a long vector in two passes (matvec.cu's argmax_gpu, the persistent decode kernel's
// LM head): every block reduces what its threads saw to one (max, index, whether any value was NaN
// or inf) in slot blockIdx.x of the partials; then one block reduces the partials. A non-finite
// value anywhere makes the result -1; the flags ride on the barrier the reduction needs anyway.
struct ArgmaxPartials { float* value; int* index; bool* nonfinite; };

// Pass 1, every thread of the block: its running (v, idx) and whether it saw a non-finite value.
__device__ __forceinline__ void store_block_argmax(ArgmaxPartials partials, float v, int idx, bool nonfinite) {
    nonfinite = __syncthreads_or(nonfinite);
    block_argmax(v, idx);
    if (threadIdx.x == 0) {
        partials.value[blockIdx.x] = v;
        partials.index[blockIdx.x] = idx;
        partials.nonfinite[blockIdx.x] = nonfinite;
    }
}

// Pass 2, one block over the first n partials (written by other blocks: read through L2); the
// argmax, or -1, is valid in thread 0.
__device__ __forceinline__ int reduce_block_argmax(ArgmaxPartials partials, int n) {
    float v = -INFINITY;
    int idx = INT_MAX;  // loses every tie with a real index
    bool nonfinite = false;
    for (int b = threadIdx.x; b < n; b += blockDim.x) {
        const float value = __ldcg(&partials.value[b]);
        const int index = __ldcg(&partials.index[b]);
        nonfinite |= __ldcg(reinterpret_cast<const unsigned char*>(&partials.nonfinite[b])) != 0;
        if (argmax_better(value, index, v, idx)) { v = value; idx = index; }
    }
    nonfinite = __syncthreads_or(nonfinite);
    block_argmax(v, idx);
    return nonfinite ? -1 : idx;  // every value finite: idx is a real index
}

// ---- matrix-vector rows -------------------------------------------------------------------------

// One warp computes dot(w[row_i], x) for the first `active` of NROWS rows at once (swiglu: gate and
// up), all lanes get the sums (0 for the inactive rows). x (cols) may live in global or shared
// memory; the rows (and int8's scales: scales[r] the scales of row r, from its first column) are
// read VIA (global: VIA_NC; the persistent decode kernel's stages in shared memory: VIA_PLAIN).
// Vector path (vec: cols % 8 == 0, w and x 16-byte aligned; int8 always): lane l reads elements
// [8l, 8l + 8) of every 256-element stretch of a row (Pack), so a warp reads 512 contiguous bytes of
// a 16-bit row per load; UNROLL stretches are loaded before any is used to keep 64 bytes per lane
// and row in flight. An int8 lane's 8 weights lie in one block: their dot product with x, times the
// block's scale, is added to the sum.
template <typename W, int NROWS, Via VIA = VIA_NC>
__device__ __forceinline__ void warp_dot_rows(float sums[NROWS], const W* const rows[NROWS], const float* x,
                                              int cols, bool vec, int active = NROWS,
                                              const __half* const* scales = nullptr) {
    constexpr int E = 8, STRETCH = 32 * E;  // elements per lane per pack, per warp per pack
    // 64 bytes in flight from global memory (fp32 2 x 32); from shared memory, ~30 cycles away, 2 stretches
    // (a 12-warp block has 168 registers a thread: 4 would spill)
    constexpr int UNROLL = VIA == VIA_PLAIN ? 2 : 64 / (E * sizeof(W)) < 2 ? 2 : 64 / (E * sizeof(W));
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < NROWS; r++) sums[r] = 0.f;
    if (vec) {
        for (int c0 = lane * E; c0 < cols; c0 += STRETCH * UNROLL) {
            Pack<W> packs[UNROLL][NROWS];
            float block_scale[UNROLL][NROWS];
#pragma unroll
            for (int u = 0; u < UNROLL; u++)
#pragma unroll
                for (int r = 0; r < NROWS; r++) {
                    const int c = c0 + STRETCH * u;
                    const bool load = r < active && c < cols;
                    packs[u][r] = load ? load_pack<W, VIA>(rows[r] + c) : zero_pack<W>();
                    if constexpr (is_int8<W>) block_scale[u][r] = load ? __half2float(load16<VIA>(scales[r] + c / Q8_BLOCK)) : 0.f;
                }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int c = c0 + STRETCH * u;
                if (c >= cols) break;
                float xv[E];
#pragma unroll
                for (int i = 0; i < E; i += 4) {
                    const float4 x4 = *reinterpret_cast<const float4*>(x + c + i);
                    xv[i] = x4.x; xv[i + 1] = x4.y; xv[i + 2] = x4.z; xv[i + 3] = x4.w;
                }
#pragma unroll
                for (int r = 0; r < NROWS; r++) {
                    float wv[E];
                    unpack(packs[u][r], wv);
                    if constexpr (is_int8<W>) {
                        float dot = 0.f;
#pragma unroll
                        for (int i = 0; i < E; i++) dot = fmaf(wv[i], xv[i], dot);
                        sums[r] = fmaf(dot, block_scale[u][r], sums[r]);
                    } else {
#pragma unroll
                        for (int i = 0; i < E; i++) sums[r] = fmaf(wv[i], xv[i], sums[r]);
                    }
                }
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            const float xc = x[c];
#pragma unroll
            for (int r = 0; r < NROWS; r++)
                if (r < active) sums[r] = fmaf(weight_at(rows[r], scales ? scales[r] : nullptr, c), xc, sums[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < NROWS; r++) sums[r] = warp_sum(sums[r]);
}

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- per-head q_norm/k_norm + RoPE + cache store ------------------------------------------------

// RoPE's inverse frequency of dimension pair i, as transformers computes it: 1 / theta^(float(2i)/hd)
// in fp32; pow is evaluated in double and rounded once, i.e. a correctly rounded powf, which is what
// the CPU float pow gives torch.
__device__ __forceinline__ float rope_inv_freq(int i, int head_dim, float theta) {
    return 1.f / (float)pow((double)theta, (double)((float)(2 * i) / (float)head_dim));
}

// One warp: x (head_dim) is RMS-normalised with `norm` (NULL: Qwen2, no norm), rotated by NeoX RoPE at
// position pos, written back in place, and, when cache_row is not NULL, stored there as x / cache_scale.
// inv_freq: rope_inv_freq of each pair (head_dim / 2), or NULL to compute them here.
template <typename KV>
__device__ __forceinline__ void norm_rope_head(float* x, const float* norm, int head_dim, int pos,
                                               float theta, float eps, KV* cache_row, float cache_scale,
                                               const float* inv_freq = nullptr) {
    const int lane = threadIdx.x % 32, half = head_dim / 2;
    float inv_rms = 1.f;
    if (norm) {
        float ss = 0.f;
        for (int i = lane; i < head_dim; i += 32) ss = fmaf(x[i], x[i], ss);
        inv_rms = rsqrtf(warp_sum(ss) / head_dim + eps);
    }
    for (int i = lane; i < half; i += 32) {
        float a = x[i] * inv_rms, b = x[i + half] * inv_rms;
        if (norm) { a *= norm[i]; b *= norm[i + half]; }
        float s, c;
        sincosf((float)pos * (inv_freq ? inv_freq[i] : rope_inv_freq(i, head_dim, theta)), &s, &c);
        const float ra = a * c - b * s, rb = b * c + a * s;
        x[i] = ra;
        x[i + half] = rb;
        if (cache_row) {
            cache_row[i] = from_float<KV>(ra / cache_scale);
            cache_row[i + half] = from_float<KV>(rb / cache_scale);
        }
    }
}

// One warp copies a row of n floats into the cache dtype.
template <typename KV>
__device__ __forceinline__ void store_row(KV* dst, const float* src, int n) {
    for (int i = threadIdx.x % 32; i < n; i += 32) dst[i] = from_float<KV>(src[i]);
}

// Heads of q then heads of k, one warp each: head < n_heads is query head `head`, the rest are KV
// heads, which also store their k and v rows at cache row pos. qkv = [q (n_heads,hd) | k | v].
template <typename KV>
__device__ __forceinline__ void qk_norm_rope_head(int head, float* q, float* k, const float* v,
                                                  const float* q_norm, const float* k_norm, float k_scale,
                                                  KV* k_cache, KV* v_cache, int pos, int n_heads,
                                                  int n_kv_heads, int head_dim, float theta, float eps,
                                                  const float* inv_freq = nullptr) {
    if (head < n_heads) {
        norm_rope_head<KV>(q + (size_t)head * head_dim, q_norm, head_dim, pos, theta, eps, nullptr, 1.f, inv_freq);
    } else {
        const int kvh = head - n_heads;
        const size_t row = ((size_t)pos * n_kv_heads + kvh) * head_dim;
        norm_rope_head<KV>(k + (size_t)kvh * head_dim, k_norm, head_dim, pos, theta, eps, k_cache + row, k_scale,
                           inv_freq);
        store_row<KV>(v_cache + row, v + (size_t)kvh * head_dim, head_dim);
    }
}
