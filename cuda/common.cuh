// Helpers shared by the kernels in cuda/: conversions between the storage dtypes and fp32, and
// a packed vector of N elements for 16-byte loads and stores. Included with a local
// #include "common.cuh"; the CUDA backend splices it into the source it gives NVRTC (so it is part of
// CuPy's cache key), the emulator and nvcc find it beside the file.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__
// NVRTC ships no C library headers: the fixed-width integers come from CCCL (bundled with CuPy),
// and INFINITY, which nvcc and the emulator get from <math.h>, is spelled out.
#include <cuda/std/cstdint>
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#else
#include <math.h>
#include <stdint.h>
#endif

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one load/store: 16 bytes on the vector path, one element on the
// scalar path. The alignment lets nvcc emit a single 128-bit access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

constexpr float kLog2e = 1.4426950408889634f;

// Element <-> float conversions on raw 16-bit patterns (no type punning of vectors), for kernels
// templated on the element type: E::to_f(bits), E::bits(x).
struct F16 {
  typedef __half T;
  static __device__ __forceinline__ float to_f(unsigned int b) { return __half2float(__ushort_as_half((unsigned short)b)); }
  static __device__ __forceinline__ unsigned int bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
};
struct BF16 {
  typedef __nv_bfloat16 T;
  static __device__ __forceinline__ float to_f(unsigned int b) { return __bfloat162float(__ushort_as_bfloat16((unsigned short)b)); }
  static __device__ __forceinline__ unsigned int bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};
