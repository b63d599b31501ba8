// tensor_core.cuh: the tensor-core and copy-engine primitives shared by matmul.cu and attention.cu's
// prefill: wgmma (sm_90a) with fp32 accumulation, TMA tensor maps and loads, cp.async, and the
// shared-memory swizzle. Register fragments are PTX's: for lane l of warp w in a warpgroup,
// g = l / 4, c = l % 4,
//   A (16x16 of a warp, row-major): a0 (row g, k 2c..2c+1), a1 (row g+8, k 2c..), a2 (row g, k 2c+8..),
//     a3 (row g+8, k 2c+8..)
//   accumulators (fp32): d[4j..4j+3] are rows 16w + g (d[4j], d[4j+1]) and 16w + g + 8 (d[4j+2], d[4j+3]),
//     columns 8j + 2c, 8j + 2c + 1
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <type_traits>
#include <cuda.h>  // CUtensorMap and the driver's tensor-map encoder (found at run time: no -lcuda)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

// Tiles are stored as rows of 16-byte chunks; chunk `ch` of row `r` goes to position ch ^ (r % 8), so
// that 8 rows of the same logical chunk hit 8 different bank groups: with 8 chunks (64 16-bit values)
// per row on a 1024-byte aligned base, the 128-byte swizzle that wgmma_desc and TMA use.
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

// ---- wgmma for attention: S = Q K^T as above, then O += P V with P in registers ------------------
// V tiles (keys x head_dim, head_dim contiguous) are B operands in N-major form (the transpose flag):
// rows of 64 16-bit values (128 bytes, one key each) in the 128-byte swizzle, 8 keys per 1024-byte
// atom. Descriptor: the stride offset (bits 32-45) steps 8 keys (1024 bytes), the leading offset
// (bits 16-29) steps to the next 64 columns of N (`n_block_bytes` further). A k16 step (16 keys)
// advances the start address by 2048 bytes.
__device__ __forceinline__ uint64_t wgmma_desc_n_major(const void* smem, uint32_t n_block_bytes) {
    const uint64_t addr = (uint64_t)__cvta_generic_to_shared(smem);
    return ((addr & 0x3FFFF) >> 4) | ((uint64_t)(n_block_bytes >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) |
           (1ull << 62);
}

// wgmma's accumulators as inline-asm operands: the register list of the instruction (operands %0..%31,
// or %0..%63) and the matching in-out constraints on d, for 32 (N = 64) or 64 (N = 128) per thread
#define WGMMA_D32_REGS "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WGMMA_D64_REGS WGMMA_D32_REGS ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, " \
                       "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WGMMA_D32(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),            \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),          \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define WGMMA_D64(d) WGMMA_D32(d),                                                                                \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),          \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),          \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),          \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// d (64 x 128 fp32, the accumulator layout above) = (accumulate ? d : 0) + a (64 x 16, k-major smem)
// * b (128 x 16, k-major smem)^T
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float d[64], uint64_t desc_a, uint64_t desc_b, bool accumulate = true);
#define WGMMA_M64N128K16(T, PTX_TYPE)                                                                               \
    template <> __device__ __forceinline__ void wgmma_m64n128k16<T>(float d[64], uint64_t desc_a, uint64_t desc_b,   \
                                                                    bool accumulate) {                              \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                   \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {" WGMMA_D64_REGS "}, " \
                     "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                                \
                     : WGMMA_D64(d) : "l"(desc_a), "l"(desc_b), "r"((int)accumulate));                               \
    }
WGMMA_M64N128K16(__nv_bfloat16, "bf16")
WGMMA_M64N128K16(__half, "f16")
#undef WGMMA_M64N128K16

// d (64 x N fp32) += a (64 x 16 in registers: warp w holds rows 16w..16w+15 as the A fragment at the
// top) * b (16 x N, N-major smem: wgmma_desc_n_major); N = 64 or 128. A_B: the operands after d.
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16_rs_n_major(float (&d)[N / 2], const uint32_t a[4], uint64_t desc_b);
#define WGMMA_RS_N_MAJOR(T, PTX_TYPE, N, D_REGS, D, A_B)                                                             \
    template <> __device__ __forceinline__ void wgmma_m64k16_rs_n_major<T, N>(float (&d)[N / 2], const uint32_t a[4], \
                                                                              uint64_t desc_b) {                     \
        asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " {" D_REGS "}, " A_B    \
                     ", 1, 1, 1, 1;\n"                                                                                \
                     : D(d) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));                              \
    }
WGMMA_RS_N_MAJOR(__nv_bfloat16, "bf16", 64, WGMMA_D32_REGS, WGMMA_D32, "{%32, %33, %34, %35}, %36")
WGMMA_RS_N_MAJOR(__half, "f16", 64, WGMMA_D32_REGS, WGMMA_D32, "{%32, %33, %34, %35}, %36")
WGMMA_RS_N_MAJOR(__nv_bfloat16, "bf16", 128, WGMMA_D64_REGS, WGMMA_D64, "{%64, %65, %66, %67}, %68")
WGMMA_RS_N_MAJOR(__half, "f16", 128, WGMMA_D64_REGS, WGMMA_D64, "{%64, %65, %66, %67}, %68")
#undef WGMMA_RS_N_MAJOR
#undef WGMMA_D32_REGS
#undef WGMMA_D64_REGS
#undef WGMMA_D32
#undef WGMMA_D64
// as fence_operand, for the 16-bit operand registers a wgmma reads (P of O += P V): they stay live,
// and unchanged, until the wgmma is known done
__device__ __forceinline__ void fence_operand(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// ---- the copy engine (TMA): tensor maps and loads -------------------------------------------------

// The driver's cuTensorMapEncodeTiled, looked up once through the runtime.
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    if (!encode) {
        void* fn = nullptr;
        cudaDriverEntryPointQueryResult found;
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || !fn) {
            fprintf(stderr, "error: the driver has no cuTensorMapEncodeTiled (TMA needs CUDA 12+)\n");
            exit(1);
        }
        encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    }
    return encode;
}

// The map of an array of 16-bit T with N dimensions (innermost first: dims, and the byte strides of
// the outer N - 1), read in boxes of `box` elements whose innermost 64 (128 bytes) come in the
// 128-byte swizzle that wgmma_desc reads; boxes reaching past the array arrive with zeros there.
template <typename T, int N>
static CUtensorMap tensor_map(const char* who, const void* base, const cuuint64_t (&dims)[N],
                              const cuuint64_t (&strides)[N - 1], const cuuint32_t (&box)[N]) {
    CUtensorMap map;
    cuuint32_t steps[N];
    for (int i = 0; i < N; i++) steps[i] = 1;
    const CUtensorMapDataType type = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                               : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const CUresult r = tensor_map_encoder()(&map, type, N, const_cast<void*>(base), dims, strides, box, steps,
                                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "error: %s: cannot describe a %d-dimensional array (%llu x %llu ...) to the copy engine "
                "(CUresult %d)\n", who, N, (unsigned long long)dims[N - 1], (unsigned long long)dims[N - 2], (int)r);
        exit(1);
    }
    return map;
}

// the box at element (x, y) (innermost first) of a 2-D map, or (x, y, z) of a 3-D one, into shared
// memory, its bytes counted on the mbarrier bar
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(smem_addr(dst)), "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, int x, int y, int z, uint64_t* bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];"
                 :: "r"(smem_addr(dst)), "l"(map), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar)) : "memory");
}
