// rmsnorm.cu: out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight, fp32 throughout.
#include "common.cuh"

// One block per row: x, out (n, dim); weight (dim).
__global__ void rmsnorm_kernel(float* out, const float* x, const float* weight, int dim, float eps) {
    griddep_wait();
    const float* xr = x + (size_t)blockIdx.x * dim;
    float* outr = out + (size_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    const float inv_rms = rsqrtf(block_sum(ss) / dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) outr[i] = xr[i] * inv_rms * weight[i];
}

extern "C" void rmsnorm_gpu(float* out, const float* x, const float* weight, int n, int dim, float eps,
                            cudaStream_t stream) {
    launch_pdl(rmsnorm_kernel, n, 256, 0, stream, out, x, weight, dim, eps);
    CUDA_CHECK(cudaGetLastError());
}
