// Small kernels that test the emulation harness itself (tests/emu/test_harness.py).
// They must stay plain CUDA: test_harness.py also compiles this file with nvcc -arch=sm_80.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

// Sum of x[blockIdx.x * blockDim.x ...] per block, tree-reduced through static shared memory.
// blockDim.x must be a power of two <= 1024. -DNO_BARRIER drops the barriers (the harness must notice).
extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float s[1024];
  int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  s[t] = i < n ? x[i] : 0.0f;
#ifndef NO_BARRIER
  __syncthreads();
#endif
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] += s[t + stride];
#ifndef NO_BARRIER
    __syncthreads();
#endif
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// out is [4][n]: shfl(src), shfl_up(delta), shfl_down(delta), shfl_xor(lane_mask), all with `width`.
extern "C" __global__ void warp_shuffles(const float* x, float* out, int n, int width, int src, unsigned delta,
                                         int lane_mask) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
  out[0 * n + i] = __shfl_sync(0xffffffffu, v, src, width);
  out[1 * n + i] = __shfl_up_sync(0xffffffffu, v, delta, width);
  out[2 * n + i] = __shfl_down_sync(0xffffffffu, v, delta, width);
  out[3 * n + i] = __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
}

// out is [3][n]: ballot, any, all over the lanes of `mask` (the other lanes skip the votes).
extern "C" __global__ void warp_votes(const int* pred, unsigned* out, int n, unsigned mask) {
  int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  if (!(mask >> lane & 1u)) return;
  int p = pred[i];
  out[0 * n + i] = __ballot_sync(mask, p);
  out[1 * n + i] = __any_sync(mask, p);
  out[2 * n + i] = __all_sync(mask, p);
  __syncwarp(mask);
}

// Per-warp sums: out[2*w] by an xor butterfly (read from lane 31), out[2*w+1] by shfl_down (lane 0).
extern "C" __global__ void warp_sums(const float* x, float* out) {
  int i = blockIdx.x * blockDim.x + threadIdx.x, w = i / 32, lane = threadIdx.x % 32;
  float a = x[i], b = x[i];
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  if (lane == 31) out[2 * w] = a;
  if (lane == 0) out[2 * w + 1] = b;
}

// Packed-half shuffle: out[i] = x[i ^ 1] within each warp.
extern "C" __global__ void shfl_half2(const __half2* x, __half2* out, __nv_bfloat162* bout) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = __shfl_xor_sync(0xffffffffu, x[i], 1);
  __nv_bfloat162 b = __floats2bfloat162_rn(__low2float(x[i]), __high2float(x[i]));
  bout[i] = __shfl_xor_sync(0xffffffffu, b, 1);
}

// count[z][y][x] += 1 for every global (x, y, z) index inside (nx, ny, nz).
extern "C" __global__ void index_cover(int* count, int nx, int ny, int nz) {
  int x = blockIdx.x * blockDim.x + threadIdx.x;
  int y = blockIdx.y * blockDim.y + threadIdx.y;
  int z = blockIdx.z * blockDim.z + threadIdx.z;
  if (threadIdx.x >= blockDim.x || threadIdx.y >= blockDim.y || threadIdx.z >= blockDim.z) return;
  if (gridDim.x * blockDim.x < (unsigned)nx) return;
  if (x < nx && y < ny && z < nz) atomicAdd(&count[(z * ny + y) * nx + x], 1);
}

// y[block][t] = x[block][blockDim.x - 1 - t] through dynamic shared memory of blockDim.x floats.
extern "C" __global__ void dyn_reverse(const float* x, float* y) {
  extern __shared__ float dsm[];
  int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  dsm[t] = x[base + t];
  __syncthreads();
  y[base + t] = dsm[blockDim.x - 1 - t];
}

// Planted bug: reads x[n], one element past the input.
extern "C" __global__ void shift_read(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];
}

// c = a + b and d = a * b + c in half; z = x + y and w = x * y in bfloat16 (fp32 math inside).
extern "C" __global__ void half_ops(const __half* a, const __half* b, __half* c, __half* d,
                                    const __nv_bfloat16* x, const __nv_bfloat16* y, __nv_bfloat16* z,
                                    __nv_bfloat16* w, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  c[i] = __hadd(a[i], b[i]);
  d[i] = __float2half(__half2float(a[i]) * __half2float(b[i]) + __half2float(c[i]));
  z[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
  w[i] = __hmul(x[i], y[i]);
}

// out[i] = x[i] * scale: with -ftz=true (CuPy's RawModule default, the emulator's too) a denormal
// input or result is flushed to zero.
extern "C" __global__ void scale_f32(const float* x, float* out, float scale, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i] * scale;
}

// Kernels that break CUDA's rules; the harness must report them, not hang.
extern "C" __global__ void exit_before_barrier(float* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void divergent_barrier(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void shfl_after_exit(float* out) {
  if (threadIdx.x % 32 < 8) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Every parameter kind, for the signature and argument checks.
extern "C" __global__ void signature_probe(float* a, const __half* b, __nv_bfloat16* c, float s, int n,
                                           long long m, unsigned u, double d) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && n > 0) a[0] = s + (float)(m + u + d) + __half2float(b[0]) + __bfloat162float(c[0]);
}
