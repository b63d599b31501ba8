// tensor_core.cuh: the tensor-core and async-copy primitives shared by matmul.cu (wgmma) and
// attention.cu's prefill (mma.sync m16n8k16 with fp32 accumulation, ldmatrix, cp.async), and the
// shared-memory swizzle both use. Fragment layouts are PTX's: for lane l, g = l / 4, c = l % 4,
//   A (16x16, row-major): a0 (row g, k 2c..2c+1), a1 (row g+8, k 2c..), a2 (row g, k 2c+8..), a3 (row g+8, k 2c+8..)
//   B (16x8, k-major):    b0 (k 2c..2c+1, col g), b1 (k 2c+8.., col g)
//   C (16x8, fp32):       c0,c1 (row g, col 2c, 2c+1), c2,c3 (row g+8, col 2c, 2c+1)
#pragma once
#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Tiles are stored as rows of 16-byte chunks; chunk `ch` of row `r` goes to position ch ^ (r % 8)
// so that the 8 rows one ldmatrix phase reads (same logical chunk) hit 8 different bank groups.
// Needs at least 8 chunks (64 16-bit values) per row.
__device__ __forceinline__ int swizzle(int row, int chunk, int chunks_per_row) {
    return row * chunks_per_row + (chunk ^ (row & 7));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    // valid == false copies nothing and zero-fills the 16 bytes (gmem must still be a legal address)
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i gets it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// c (16x8 fp32) += a (16x16) * b (16x8), operands bf16 or fp16
template <typename T> __device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed into one register, `lo` in the low half (the lower k / column).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
// Two (four) consecutive floats stored as T at p, aligned to their size: one store
template <typename T> __device__ __forceinline__ void store2(T* p, float a, float b) {
    if constexpr (sizeof(T) == 4) *reinterpret_cast<float2*>(p) = make_float2(a, b);
    else *reinterpret_cast<uint32_t*>(p) = pack2<T>(a, b);
}
template <typename T> __device__ __forceinline__ void store4(T* p, float4 v) {
    if constexpr (sizeof(T) == 4) *reinterpret_cast<float4*>(p) = v;
    else *reinterpret_cast<uint2*>(p) = make_uint2(pack2<T>(v.x, v.y), pack2<T>(v.z, v.w));
}
// 8 floats -> one 16-byte chunk of T
template <typename T> __device__ __forceinline__ uint4 pack8(float4 a, float4 b) {
    return make_uint4(pack2<T>(a.x, a.y), pack2<T>(a.z, a.w), pack2<T>(b.x, b.y), pack2<T>(b.z, b.w));
}

// ---- wgmma (sm_90a): a warpgroup of 4 warps, B (and here A) read straight from shared memory ----
// Operand tiles are k-major rows of 64 16-bit values (128 bytes) in the 128-byte swizzle, which is
// `swizzle(row, chunk, 8)` above on a 1024-byte aligned base; 8-row groups are 1024 bytes apart.
// Descriptor: start address >> 4 (bits 0-13), leading offset (unused for swizzled k-major, 1),
// stride offset 1024 >> 4 (bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63). A k16 step
// within the 64-wide row advances the start address by 32 bytes.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem) {
    const uint64_t addr = (uint64_t)__cvta_generic_to_shared(smem);
    return ((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// until at most N of this warpgroup's committed groups are still running
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// ordinary shared-memory stores (st.shared, cp.async) made visible to the async proxy (wgmma)
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Warp-specialized kernels: a warpgroup gives back registers it does not need (dec) or takes them
// (inc), so that the consumers can hold large accumulator tiles; the kernel needs
// __launch_bounds__(threads, 1), and every warp of the warpgroup runs it.
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
// keeps the compiler from moving accumulator reads/writes across an asynchronous wgmma
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// d (64 x 128 fp32, the C fragment layout repeated over 16 column tiles: d[4j..4j+3] is columns
// 8j..8j+7 of rows 16 warp + lane/4 (+8)) += a (64 x 16, k-major smem) * b (128 x 16, k-major smem)^T
template <typename T> __device__ __forceinline__ void wgmma_m64n128k16(float d[64], uint64_t desc_a, uint64_t desc_b);
#define WGMMA_M64N128K16(T, PTX_TYPE)                                                                          \
    template <> __device__ __forceinline__ void wgmma_m64n128k16<T>(float d[64], uint64_t desc_a, uint64_t desc_b) { \
        asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " "                      \
                     "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
                     "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "   \
                     "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "   \
                     "%56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, 1, 1, 1, 0, 0;\n"                         \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),         \
                       "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),     \
                       "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),  \
                       "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),  \
                       "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),  \
                       "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),  \
                       "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),  \
                       "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),  \
                       "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),  \
                       "+f"(d[63])                                                                                 \
                     : "l"(desc_a), "l"(desc_b));                                                                  \
    }
WGMMA_M64N128K16(__nv_bfloat16, "bf16")
WGMMA_M64N128K16(__half, "f16")
#undef WGMMA_M64N128K16
