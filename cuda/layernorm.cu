// RMSNorm and fused residual-add + RMSNorm.
//
//   rms_norm:            out[t, :] = x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * w
//   fused_add_rms_norm:  residual[t, :] += x[t, :]   (in place, rounded to the storage dtype)
//                        out[t, :] = rms_norm(residual[t, :])
//
// Launch: grid (T,), block (256,) recommended; any multiple of 32 up to 1024 works, no
// dynamic shared memory. One block owns one row, so the sum of squares is a block
// reduction (warp shuffles, then one float per warp in __shared__) and no second kernel or
// atomics are needed.
//
// Why this shape: the op is memory bound (one read of x, one write of out; the fused form
// also reads and writes residual), so the goal is each byte touched once. The first pass
// loads the row with 16-byte vectors (uint4 / float4) and keeps it in registers, up to
// CACHE vectors per thread: 32 elements per thread, i.e. H <= 8192 at 256 threads. The
// second pass normalises from registers, so x is read once. Longer rows fall back to
// re-reading the uncached part from global memory (L2 hits in practice). Rows whose byte
// size is not a multiple of 16 (H % 8 != 0 for 16-bit types, H % 4 != 0 for fp32), or
// misaligned pointers, take the same code with one element per "vector" (scalar path);
// real models always take the vector path. All arithmetic is fp32.
#include "common.cuh"

namespace {

// Sum of `v` over the block; every thread gets the result. blockDim.x % 32 == 0.
__device__ __forceinline__ float block_sum(float v, float* red /* [32] shared */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = lane < nwarps ? red[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // red[] is not reused, so no trailing barrier is needed
}

// One row. `residual` null: plain RMSNorm of x. Non-null: residual += x first, and the
// normalised value is the rounded sum (what a separate add then norm would see).
template <typename T, int N, int CACHE>
__device__ __forceinline__ void norm_row(T* __restrict__ out,       // [H]
                                         T* __restrict__ residual,  // [H] or null
                                         const T* __restrict__ x,   // [H]
                                         const T* __restrict__ w,   // [H]
                                         float eps, int H, float* red) {
  typedef Pack<T, N> P;
  const int nvec = H / N;
  const int tid = threadIdx.x, nt = blockDim.x;
  const P* xv = reinterpret_cast<const P*>(x);
  P* rv = reinterpret_cast<P*>(residual);
  P row[CACHE];
  float ss = 0.0f;

  // pass 1: load (and add), cache in registers, sum of squares
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = tid + c * nt;
    if (i < nvec) {
      P a = xv[i];
      if (residual != nullptr) {
        const P r = rv[i];
#pragma unroll
        for (int j = 0; j < N; ++j) a.v[j] = from_f32<T>(to_f32(a.v[j]) + to_f32(r.v[j]));
        rv[i] = a;
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float f = to_f32(a.v[j]);
        ss += f * f;
      }
      row[c] = a;
    }
  }
  for (int i = tid + CACHE * nt; i < nvec; i += nt) {  // rows longer than the cache
    P a = xv[i];
    if (residual != nullptr) {
      const P r = rv[i];
#pragma unroll
      for (int j = 0; j < N; ++j) a.v[j] = from_f32<T>(to_f32(a.v[j]) + to_f32(r.v[j]));
      rv[i] = a;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = to_f32(a.v[j]);
      ss += f * f;
    }
  }

  const float rstd = rsqrtf(block_sum(ss, red) / (float)H + eps);

  // pass 2: scale by rstd * w and store
  const P* wv = reinterpret_cast<const P*>(w);
  P* ov = reinterpret_cast<P*>(out);
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    const int i = tid + c * nt;
    if (i < nvec) {
      const P wi = wv[i];
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(to_f32(row[c].v[j]) * rstd * to_f32(wi.v[j]));
      ov[i] = o;
    }
  }
  // Uncached tail: re-read what pass 1 left behind. Each thread re-reads its own residual
  // elements, which it wrote itself, so no barrier is needed between the passes.
  const P* src = residual != nullptr ? reinterpret_cast<const P*>(residual) : xv;
  for (int i = tid + CACHE * nt; i < nvec; i += nt) {
    const P a = src[i], wi = wv[i];
    P o;
#pragma unroll
    for (int j = 0; j < N; ++j) o.v[j] = from_f32<T>(to_f32(a.v[j]) * rstd * to_f32(wi.v[j]));
    ov[i] = o;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Vector path when every row starts on a 16-byte boundary; the test is uniform per launch.
template <typename T>
__device__ __forceinline__ void norm_dispatch(T* out, T* residual, const T* x, const T* w,
                                              float eps, int H) {
  constexpr int N = 16 / sizeof(T);   // 8 for fp16/bf16, 4 for fp32
  constexpr int CACHE = 32 / N;       // 32 elements per thread in registers
  __shared__ float red[32];
  const long long off = (long long)blockIdx.x * H;
  const bool vec = (H % N == 0) && aligned16(out) && aligned16(x) && aligned16(w) &&
                   (residual == nullptr || aligned16(residual));
  if (vec) {
    norm_row<T, N, CACHE>(out + off, residual ? residual + off : nullptr, x + off, w, eps, H, red);
  } else {
    norm_row<T, 1, 32>(out + off, residual ? residual + off : nullptr, x + off, w, eps, H, red);
  }
}

template <typename T>
__device__ void rms_norm(T* __restrict__ out,      // [T, H]
                         const T* __restrict__ x,  // [T, H]
                         const T* __restrict__ w,  // [H]
                         float eps, int H) {
  norm_dispatch<T>(out, nullptr, x, w, eps, H);
}

template <typename T>
__device__ void fused_add_rms_norm(T* __restrict__ out,       // [T, H]
                                   T* __restrict__ residual,  // [T, H], += x in place
                                   const T* __restrict__ x,   // [T, H]
                                   const T* __restrict__ w,   // [H]
                                   float eps, int H) {
  norm_dispatch<T>(out, residual, x, w, eps, H);
}

}  // namespace

// ---- entry points: grid (T,), block (256,) ------------------------------------------------
extern "C" __global__ void rms_norm_f16(__half* out /* [T, H] */, const __half* x /* [T, H] */,
                                             const __half* w /* [H] */, float eps, int H) {
  rms_norm<__half>(out, x, w, eps, H);
}
extern "C" __global__ void fused_add_rms_norm_f16(
    __half* out /* [T, H] */, __half* residual /* [T, H] */, const __half* x /* [T, H] */,
    const __half* w /* [H] */, float eps, int H) {
  fused_add_rms_norm<__half>(out, residual, x, w, eps, H);
}

extern "C" __global__ void rms_norm_bf16(__nv_bfloat16* out /* [T, H] */, const __nv_bfloat16* x /* [T, H] */,
                                             const __nv_bfloat16* w /* [H] */, float eps, int H) {
  rms_norm<__nv_bfloat16>(out, x, w, eps, H);
}
extern "C" __global__ void fused_add_rms_norm_bf16(
    __nv_bfloat16* out /* [T, H] */, __nv_bfloat16* residual /* [T, H] */, const __nv_bfloat16* x /* [T, H] */,
    const __nv_bfloat16* w /* [H] */, float eps, int H) {
  fused_add_rms_norm<__nv_bfloat16>(out, residual, x, w, eps, H);
}

extern "C" __global__ void rms_norm_f32(float* out /* [T, H] */, const float* x /* [T, H] */,
                                             const float* w /* [H] */, float eps, int H) {
  rms_norm<float>(out, x, w, eps, H);
}
extern "C" __global__ void fused_add_rms_norm_f32(
    float* out /* [T, H] */, float* residual /* [T, H] */, const float* x /* [T, H] */,
    const float* w /* [H] */, float eps, int H) {
  fused_add_rms_norm<float>(out, residual, x, w, eps, H);
}
