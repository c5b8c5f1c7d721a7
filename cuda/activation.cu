// SiLU-and-multiply, the gated MLP activation (SwiGLU).
//
//   x [T, 2I] = [gate | up]  ->  out[t, i] = silu(gate[t, i]) * up[t, i],  silu(g) = g / (1 + e^-g)
//
// Launch: grid (T, ceil(I / (256 * 8))) with block (256,) is a good default; any grid.y >= 1
// and any block size work (threads stride over the row), no shared memory. One block row
// per token keeps the gate and up halves of a row in the same block without index division.
//
// Why: the op is a pure stream (read 2I, write I elements), so the design is 16-byte
// vector loads of gate and up and a 16-byte store, 8 fp16/bf16 or 4 fp32 elements per
// thread per step. The vector path needs every row of gate, up and out on a 16-byte
// boundary, which holds when I is a multiple of 8 (16-bit) or 4 (fp32) and the pointers
// are aligned; otherwise the same loop runs with one element per step. Math is fp32.
#include "common.cuh"

namespace {

template <typename T, int N>
__device__ __forceinline__ void silu_mul_row(T* __restrict__ out,        // [I]
                                             const T* __restrict__ gate, // [I]
                                             const T* __restrict__ up,   // [I]
                                             int I) {
  typedef Pack<T, N> P;
  const int nvec = I / N;
  const P* gv = reinterpret_cast<const P*>(gate);
  const P* uv = reinterpret_cast<const P*>(up);
  P* ov = reinterpret_cast<P*>(out);
  const int stride = blockDim.x * gridDim.y;
  for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < nvec; i += stride) {
    const P g = gv[i], u = uv[i];
    P o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float gf = to_f32(g.v[j]);
      o.v[j] = from_f32<T>(gf / (1.0f + __expf(-gf)) * to_f32(u.v[j]));
    }
    ov[i] = o;
  }
}

template <typename T>
__device__ void silu_and_mul(T* __restrict__ out,      // [T, I]
                             const T* __restrict__ x,  // [T, 2I]
                             int I) {
  constexpr int N = 16 / sizeof(T);
  const long long t = blockIdx.x;
  const T* gate = x + t * 2 * I;
  T* o = out + t * I;
  const bool vec = (I % N == 0) && ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  if (vec) {
    silu_mul_row<T, N>(o, gate, gate + I, I);
  } else {
    silu_mul_row<T, 1>(o, gate, gate + I, I);
  }
}

}  // namespace

// ---- entry points: grid (T, ceil(I / 2048)), block (256,) -----------------------------------
extern "C" __global__ void silu_and_mul_f16(__half* out /* [T, I] */,
                                                 const __half* x /* [T, 2I] */, int I) {
  silu_and_mul<__half>(out, x, I);
}

extern "C" __global__ void silu_and_mul_bf16(__nv_bfloat16* out /* [T, I] */,
                                                 const __nv_bfloat16* x /* [T, 2I] */, int I) {
  silu_and_mul<__nv_bfloat16>(out, x, I);
}

extern "C" __global__ void silu_and_mul_f32(float* out /* [T, I] */,
                                                 const float* x /* [T, 2I] */, int I) {
  silu_and_mul<float>(out, x, I);
}
