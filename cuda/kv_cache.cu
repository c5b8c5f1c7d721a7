// Paged KV cache writes and block copies. Layout (cupaged.backend.ops): per layer, K and V
// each as [NB, BS, Hk, D]; slot s = block_id * BS + offset addresses one contiguous
// [Hk, D] row at element s * Hk * D, so a cache write is a scatter of whole rows.
//
// reshape_and_cache: k, v [T, Hk, D] -> k_cache, v_cache at slot_mapping[t]; a slot < 0
//   (padding) is skipped. Launch: grid (T,), block (128,) (any size works). One block per
//   token copies the token's K and V rows; threads stride over 16-byte vectors.
//   k and v may be views into a fused qkv buffer: k_stride / v_stride are the element
//   distances between consecutive tokens (Hk * D when contiguous).
// copy_blocks: pairs [P, 2] of (src, dst) block ids, for one layer's K and V caches in one
//   launch. Launch: grid (P, 2), block (256,): blockIdx.y picks the cache (0 = K, 1 = V).
//   Pairs run concurrently, so no dst may also be a src or appear twice in one launch
//   (copy-on-write produces fresh dst blocks, which satisfies this).
//
// Why: both ops are pure copies, so they move uint4 (16 bytes) per thread per step when
// the row length, strides and pointers allow, and one element at a time otherwise. Offsets
// are computed in 64 bits: a cache can exceed 2^31 elements.
#include "common.cuh"

namespace {

// Copy n elements of T from src to dst, with 16-byte vectors when both are aligned and n
// fills whole vectors; threads [first, first + nthreads) share the work.
template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, long long n,
                                         long long first, long long nthreads) {
  constexpr int N = 16 / sizeof(T);
  const bool vec = n % N == 0 &&
                   ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u) == 0;
  if (vec) {
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint4* s = reinterpret_cast<const uint4*>(src);
    for (long long i = first; i < n / N; i += nthreads) d[i] = s[i];
  } else {
    for (long long i = first; i < n; i += nthreads) dst[i] = src[i];
  }
}

template <typename T>
__device__ void reshape_and_cache(T* __restrict__ k_cache,              // [NB, BS, Hk, D]
                                  T* __restrict__ v_cache,              // [NB, BS, Hk, D]
                                  const T* __restrict__ k,              // [T, k_stride], rows [Hk, D]
                                  const T* __restrict__ v,              // [T, v_stride], rows [Hk, D]
                                  const int* __restrict__ slot_mapping, // [T]
                                  int k_stride, int v_stride, int row) {  // row = Hk * D
  const int t = blockIdx.x;
  const int slot = slot_mapping[t];
  if (slot < 0) return;  // the whole block leaves together: no barrier follows
  const long long dst = (long long)slot * row;
  copy_row<T>(k_cache + dst, k + (long long)t * k_stride, row, threadIdx.x, blockDim.x);
  copy_row<T>(v_cache + dst, v + (long long)t * v_stride, row, threadIdx.x, blockDim.x);
}

template <typename T>
__device__ void copy_blocks(T* __restrict__ k_cache,        // [NB, BS, Hk, D]
                            T* __restrict__ v_cache,        // [NB, BS, Hk, D]
                            const int* __restrict__ pairs,  // [P, 2] (src, dst)
                            int block_elems) {              // BS * Hk * D
  const int p = blockIdx.x;
  T* cache = blockIdx.y == 0 ? k_cache : v_cache;
  const long long src = (long long)pairs[2 * p] * block_elems;
  const long long dst = (long long)pairs[2 * p + 1] * block_elems;
  copy_row<T>(cache + dst, cache + src, block_elems, threadIdx.x, blockDim.x);
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------
/* grid (T,), block (128,) */
extern "C" __global__ void reshape_and_cache_f16(
    __half* k_cache /* [NB, BS, Hk, D] */, __half* v_cache /* [NB, BS, Hk, D] */,
    const __half* k /* [T, k_stride] */, const __half* v /* [T, v_stride] */,
    const int* slot_mapping /* [T] */, int k_stride, int v_stride, int row /* Hk * D */) {
  reshape_and_cache<__half>(k_cache, v_cache, k, v, slot_mapping, k_stride, v_stride, row);
}
/* grid (P, 2), block (256,) */
extern "C" __global__ void copy_blocks_f16(__half* k_cache /* [NB, BS, Hk, D] */,
                                                __half* v_cache /* [NB, BS, Hk, D] */,
                                                const int* pairs /* [P, 2] */,
                                                int block_elems /* BS * Hk * D */) {
  copy_blocks<__half>(k_cache, v_cache, pairs, block_elems);
}

/* grid (T,), block (128,) */
extern "C" __global__ void reshape_and_cache_bf16(
    __nv_bfloat16* k_cache /* [NB, BS, Hk, D] */, __nv_bfloat16* v_cache /* [NB, BS, Hk, D] */,
    const __nv_bfloat16* k /* [T, k_stride] */, const __nv_bfloat16* v /* [T, v_stride] */,
    const int* slot_mapping /* [T] */, int k_stride, int v_stride, int row /* Hk * D */) {
  reshape_and_cache<__nv_bfloat16>(k_cache, v_cache, k, v, slot_mapping, k_stride, v_stride, row);
}
/* grid (P, 2), block (256,) */
extern "C" __global__ void copy_blocks_bf16(__nv_bfloat16* k_cache /* [NB, BS, Hk, D] */,
                                                __nv_bfloat16* v_cache /* [NB, BS, Hk, D] */,
                                                const int* pairs /* [P, 2] */,
                                                int block_elems /* BS * Hk * D */) {
  copy_blocks<__nv_bfloat16>(k_cache, v_cache, pairs, block_elems);
}

/* grid (T,), block (128,) */
extern "C" __global__ void reshape_and_cache_f32(
    float* k_cache /* [NB, BS, Hk, D] */, float* v_cache /* [NB, BS, Hk, D] */,
    const float* k /* [T, k_stride] */, const float* v /* [T, v_stride] */,
    const int* slot_mapping /* [T] */, int k_stride, int v_stride, int row /* Hk * D */) {
  reshape_and_cache<float>(k_cache, v_cache, k, v, slot_mapping, k_stride, v_stride, row);
}
/* grid (P, 2), block (256,) */
extern "C" __global__ void copy_blocks_f32(float* k_cache /* [NB, BS, Hk, D] */,
                                                float* v_cache /* [NB, BS, Hk, D] */,
                                                const int* pairs /* [P, 2] */,
                                                int block_elems /* BS * Hk * D */) {
  copy_blocks<float>(k_cache, v_cache, pairs, block_elems);
}
