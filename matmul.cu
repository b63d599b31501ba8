// matmul.cu: the prefill matrix products, out (T, rows) (+)= x (T, cols) . w (rows, cols)^T + bias,
// on the tensor cores (wgmma, sm_90a, fp32 accumulation), and the batched SwiGLU gate.
// Both operands are k-major (x rows and w rows are contiguous in k), the layout wgmma reads
// without a transpose.
#include "common.cuh"
#include "tensor_core.cuh"

// Block tile 128 tokens x 128 weight rows x 64 k, two warpgroups (256 threads), warpgroup g
// computing tokens 64g..64g+63 x all 128 rows with wgmma m64n128k16 (64 fp32 accumulators per
// thread). 3 shared-memory stages: the weight tile of k step kt+2 streams in with cp.async, and the
// fp32 activation tile of kt+2 is loaded to registers, while the wgmmas of kt run; the activations
// are rounded to 16 bits on their way into shared memory one step later. int8 weights take the
// activations' way: loaded to registers with their scales, dequantized and rounded to bf16 on
// their way into shared memory.
constexpr int MM_BM = 128, MM_BN = 128, MM_BK = 64, MM_STAGES = 3, MM_THREADS = 256;
constexpr int MM_CHUNKS = MM_BK / 8;                                         // 16-byte chunks per tile row
constexpr int MM_STAGE_CHUNKS = (MM_BM + MM_BN) * MM_CHUNKS;                 // A tile then B tile, 32 KB
constexpr int MM_LOADS = MM_BM * MM_CHUNKS / MM_THREADS;                     // chunks per thread per tile (4)
constexpr size_t MM_SMEM = (size_t)MM_STAGES * MM_STAGE_CHUNKS * 16 + 1024;  // + room to align to 1024

// out (n_tokens, rows) (+)= x (n_tokens, cols) fp32 . w (rows, cols)^T of W + bias (rows) or NULL,
// on the tensor cores in T (W itself, or bf16 for int8 W, whose scales are (rows, cols / Q8_BLOCK)).
// Grid (token tiles, row tiles): consecutive blocks share a weight tile, so the LM head's weights
// stream from DRAM once. cols % 8 == 0: a chunk of 8 k is entirely inside or outside the matrix
// (int8: inside one block of scale).
template <typename T, typename W>
__global__ void __launch_bounds__(MM_THREADS) matmul_tc_kernel(float* out, const W* w, const __half* scales,
                                                             const float* x, const float* bias, int n_tokens,
                                                             int rows, int cols, int accumulate) {
    extern __shared__ uint8_t mm_smem_raw[];
    uint4* smem = reinterpret_cast<uint4*>(((uintptr_t)mm_smem_raw + 1023) & ~(uintptr_t)1023);  // swizzle atom
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
    const int m0 = blockIdx.x * MM_BM, n0 = blockIdx.y * MM_BN;
    const int k_tiles = (cols + MM_BK - 1) / MM_BK;

    float4 a_next[MM_LOADS][2];  // the next activation tile, 8 floats per chunk
    auto load_a = [&](int kt) {
#pragma unroll
        for (int i = 0; i < MM_LOADS; i++) {
            const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
            const int t = m0 + r, k = kt * MM_BK + ch * 8;
            if (t < n_tokens && k < cols) {
                const float4* p = reinterpret_cast<const float4*>(x + (size_t)t * cols + k);
                a_next[i][0] = __ldg(p);
                a_next[i][1] = __ldg(p + 1);
            } else {
                a_next[i][0] = a_next[i][1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
        }
    };
    auto store_a = [&](int stage) {
        uint4* sa = smem + stage * MM_STAGE_CHUNKS;
#pragma unroll
        for (int i = 0; i < MM_LOADS; i++) {
            const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
            sa[swizzle(r, ch, MM_CHUNKS)] = pack8<T>(a_next[i][0], a_next[i][1]);
        }
    };
    uint2 b_next[MM_LOADS];  // int8: the next weight tile, 8 values per chunk, and their scales
    float b_scale[MM_LOADS];
    auto load_b = [&](int kt, int stage) {  // 16-bit: cp.async straight into the stage; int8: to registers
        uint4* sb = smem + stage * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
#pragma unroll
        for (int i = 0; i < MM_LOADS; i++) {
            const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
            const int n = n0 + r, k = kt * MM_BK + ch * 8;
            const bool valid = n < rows && k < cols;
            if constexpr (is_int8<W>) {
                const size_t at = (size_t)n * cols + k;
                b_next[i] = valid ? __ldg(reinterpret_cast<const uint2*>(w + at)) : make_uint2(0, 0);
                b_scale[i] = valid ? __half2float(__ldg(scales + at / Q8_BLOCK)) : 0.f;
            } else {
                cp_async16(&sb[swizzle(r, ch, MM_CHUNKS)], valid ? w + (size_t)n * cols + k : w, valid);
            }
        }
    };
    auto store_b = [&](int stage) {  // int8: the registers, dequantized (exact in fp32) and rounded to bf16
        if constexpr (is_int8<W>) {
            uint4* sb = smem + stage * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
#pragma unroll
            for (int i = 0; i < MM_LOADS; i++) {
                const int id = tid + i * MM_THREADS, r = id / MM_CHUNKS, ch = id % MM_CHUNKS;
                float f[8];
                int8x4_to_float(b_next[i].x, f);
                int8x4_to_float(b_next[i].y, f + 4);
                const float s = b_scale[i];
                sb[swizzle(r, ch, MM_CHUNKS)] = pack8<T>(make_float4(f[0] * s, f[1] * s, f[2] * s, f[3] * s),
                                                         make_float4(f[4] * s, f[5] * s, f[6] * s, f[7] * s));
            }
        }
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.f;
    // prologue: tiles 0 and 1 of B in flight (one commit group per k tile, empty ones included, so
    // that "all but the newest group done" always means "tile kt has landed"); A of tile 0 stored,
    // A of tile 1 in registers
    load_b(0, 0);
    load_a(0);
    store_a(0);
    store_b(0);
    cp_async_commit();
    if (1 < k_tiles) {
        load_b(1, 1);
        load_a(1);
    }
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; kt++) {
        cp_async_wait<1>();
        fence_proxy_async();  // this thread's st.shared / cp.async writes, visible to wgmma
        __syncthreads();      // ... of every thread; and stage (kt-1) % 3 is free (its wgmmas waited)
        const uint4* sa = smem + (kt % MM_STAGES) * MM_STAGE_CHUNKS + wg * 64 * MM_CHUNKS;
        const uint4* sb = smem + (kt % MM_STAGES) * MM_STAGE_CHUNKS + MM_BM * MM_CHUNKS;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < MM_BK / 16; ks++)  // k16 step = 32 bytes further into each 128-byte row
            wgmma_m64n128k16<T>(acc, wgmma_desc(sa) + 2 * ks, wgmma_desc(sb) + 2 * ks);
        wgmma_commit();
        // while the tensor cores run: A of tile kt+1 into its stage, loads of tile kt+2 issued
        if (kt + 1 < k_tiles) {
            store_a((kt + 1) % MM_STAGES);
            store_b((kt + 1) % MM_STAGES);
        }
        if (kt + 2 < k_tiles) {
            load_b(kt + 2, (kt + 2) % MM_STAGES);
            load_a(kt + 2);
        }
        cp_async_commit();
        wgmma_wait_all();
#pragma unroll
        for (int i = 0; i < 64; i++) fence_operand(acc[i]);
    }

    // epilogue: acc[4j + 2h + e] is token 16 (warp % 4) + lane/4 + 8h of this warpgroup's 64, weight
    // row 8j + 2 (lane % 4) + e; rows % 8 == 0 keeps a pair inside or outside the matrix
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int r = n0 + j * 8 + (lane % 4) * 2;
        if (r >= rows) continue;
        const float2 b = bias ? make_float2(bias[r], bias[r + 1]) : make_float2(0.f, 0.f);
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int t = m0 + wg * 64 + (warp % 4) * 16 + lane / 4 + h * 8;
            if (t >= n_tokens) continue;
            float2* o = reinterpret_cast<float2*>(out + (size_t)t * rows + r);
            float2 v = make_float2(acc[4 * j + 2 * h] + b.x, acc[4 * j + 2 * h + 1] + b.y);
            if (accumulate) { const float2 prev = *o; v.x += prev.x; v.y += prev.y; }
            *o = v;
        }
    }
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

template <typename T, typename W>
static void launch_matmul_tc(float* out, const void* w, const void* scales, const float* x, const float* bias,
                             int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream) {
    static bool configured = false;  // the > 48 KB shared-memory opt-in, once per instantiation
    auto kernel = matmul_tc_kernel<T, W>;
    if (!configured) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)MM_SMEM));
        configured = true;
    }
    const dim3 grid((n_tokens + MM_BM - 1) / MM_BM, (rows + MM_BN - 1) / MM_BN);
    kernel<<<grid, MM_THREADS, MM_SMEM, stream>>>(out, (const W*)w, (const __half*)scales, x, bias, n_tokens, rows,
                                                  cols, accumulate);
}

extern "C" void matmul_gpu(float* out, const void* w, const void* scales, int wdtype, const float* x,
                           const float* bias, int n_tokens, int rows, int cols, int accumulate, cudaStream_t stream) {
    if (n_tokens < 1 || rows < 8 || rows % 8 || cols < 8 || cols % 8 || !aligned16(w) || !aligned16(x) ||
        (wdtype == DT_INT8 && (cols % Q8_BLOCK || !scales))) {
        fprintf(stderr, "error: matmul_gpu: need n_tokens >= 1, rows and cols multiples of 8 (int8: cols of %d, "
                        "and scales), 16-byte aligned w and x (got %d, %d, %d)\n", Q8_BLOCK, n_tokens, rows, cols);
        exit(1);
    }
    if (wdtype == DT_BF16) {
        launch_matmul_tc<__nv_bfloat16, __nv_bfloat16>(out, w, nullptr, x, bias, n_tokens, rows, cols, accumulate, stream);
    } else if (wdtype == DT_F16) {
        launch_matmul_tc<__half, __half>(out, w, nullptr, x, bias, n_tokens, rows, cols, accumulate, stream);
    } else if (wdtype == DT_INT8) {
        launch_matmul_tc<__nv_bfloat16, int8_t>(out, w, scales, x, bias, n_tokens, rows, cols, accumulate, stream);
    } else if (wdtype == DT_F32) {
        const dim3 grid((rows + MM_F32_TILE - 1) / MM_F32_TILE, (n_tokens + MM_F32_TILE - 1) / MM_F32_TILE);
        matmul_f32_kernel<<<grid, dim3(MM_F32_TILE, MM_F32_TILE), 0, stream>>>(out, (const float*)w, x, bias,
                                                                               n_tokens, rows, cols, accumulate);
    } else {
        fprintf(stderr, "error: matmul_gpu: unknown weight dtype %d\n", wdtype);
        exit(1);
    }
    CUDA_CHECK(cudaGetLastError());
}

// h (n_tokens, hidden) = silu(gate) * up, gate_up (n_tokens, 2*hidden) = [gate | up] per token.
// One thread per 4 outputs (hidden % 4 == 0): 16-byte loads and stores.
__global__ void swiglu_kernel(float* h, const float* gate_up, int n_tokens, int hidden) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= (size_t)n_tokens * hidden) return;
    const size_t t = i / hidden, j = i % hidden;
    const float4 g = *reinterpret_cast<const float4*>(gate_up + t * 2 * hidden + j);
    const float4 u = *reinterpret_cast<const float4*>(gate_up + t * 2 * hidden + hidden + j);
    float4 r;
    r.x = g.x / (1.f + expf(-g.x)) * u.x;
    r.y = g.y / (1.f + expf(-g.y)) * u.y;
    r.z = g.z / (1.f + expf(-g.z)) * u.z;
    r.w = g.w / (1.f + expf(-g.w)) * u.w;
    *reinterpret_cast<float4*>(h + i) = r;
}

extern "C" void swiglu_gpu(float* h, const float* gate_up, int n_tokens, int hidden, cudaStream_t stream) {
    if (hidden % 4 || !aligned16(h) || !aligned16(gate_up)) {
        fprintf(stderr, "error: swiglu_gpu: hidden %d is not a multiple of 4, or unaligned buffers\n", hidden);
        exit(1);
    }
    const size_t threads = (size_t)n_tokens * hidden / 4;
    swiglu_kernel<<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(h, gate_up, n_tokens, hidden);
    CUDA_CHECK(cudaGetLastError());
}
