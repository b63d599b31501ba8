// rmsnorm.cu: out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, in fp32, stored as fp32 (decode)
// or rounded to the type the prefill matrix products read (bf16, fp16).
#include "common.cuh"

// One block per row: x (n, dim) fp32, out (n, dim) of O; weight (dim).
template <typename O>
__global__ void rmsnorm_kernel(O* out, const float* x, const float* weight, int dim, float eps) {
    griddep_wait();
    const float* xr = x + (size_t)blockIdx.x * dim;
    O* outr = out + (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    const float inv_rms = rsqrtf(block_sum(ss) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) outr[i] = from_float<O>(xr[i] * inv_rms * weight[i]);
}

extern "C" void rmsnorm_gpu(void* out, int out_dtype, const float* x, const float* weight, int n, int dim, float eps,
                            cudaStream_t stream) {
    DISPATCH_ACT(out_dtype, "rmsnorm_gpu",
                 launch_pdl(rmsnorm_kernel<A>, n, 256, 0, stream, (A*)out, x, weight, dim, eps));
    CUDA_CHECK(cudaGetLastError());
}
