// Rotary position embedding (RoPE), in place on q and k, NeoX and GPT-J styles.
//
// For token t at position p = positions[t], with half = rot_dim / 2 and
// cos = cos_sin_cache[p, 0:half], sin = cos_sin_cache[p, half:rot_dim], each head's
// feature pairs (a, b) rotate:
//   x[a] <- x[a] * cos[i] - x[b] * sin[i]
//   x[b] <- x[b] * cos[i] + x[a] * sin[i]
// NeoX style pairs a = i, b = i + half; GPT-J style pairs a = 2i, b = 2i + 1. Features at
// or past rot_dim (partial rotary) are left as they are.
//
// Launch: grid (T,), block (128,) recommended (any size works, no shared memory). One block
// owns one token: its threads stride over the (Hq + Hk) * half pairs of that token, q's
// heads first. The cos/sin row is read once per pair from L1/L2; it is float32 for every
// entry dtype (a [max_pos, rot_dim] table is small, and fp32 keeps the angles exact to
// the rounding of the final store). Each pair is read and written by one thread, so there
// are no barriers and no races. q and k may be views into a fused qkv buffer: q_stride and
// k_stride are the element distances between consecutive tokens (Hq * D and Hk * D when
// contiguous); heads within a token must be contiguous. The op moves 2 bytes per element
// once and is a small share of a layer, so pairs are moved as scalars, not vectors.
#include "common.cuh"

namespace {

template <typename T>
__device__ __forceinline__ void rotate_pair(T* __restrict__ head,  // [D], one head of q or k
                                            int i, int half, int is_neox, float c, float s) {
  const int a = is_neox ? i : 2 * i;
  const int b = is_neox ? i + half : 2 * i + 1;
  const float x1 = to_f32(head[a]);
  const float x2 = to_f32(head[b]);
  head[a] = from_f32<T>(x1 * c - x2 * s);
  head[b] = from_f32<T>(x2 * c + x1 * s);
}

template <typename T>
__device__ void rotary_embedding(const int* __restrict__ positions,       // [T]
                                 T* __restrict__ q,                       // [T, q_stride], heads [Hq, D]
                                 T* __restrict__ k,                       // [T, k_stride], heads [Hk, D]
                                 const float* __restrict__ cos_sin_cache, // [max_pos, rot_dim]
                                 int q_stride, int k_stride, int Hq, int Hk, int D,
                                 int rot_dim, int is_neox) {
  const int t = blockIdx.x;
  const int half = rot_dim / 2;
  const float* cs = cos_sin_cache + (long long)positions[t] * rot_dim;
  T* qt = q + (long long)t * q_stride;
  T* kt = k + (long long)t * k_stride;
  const int nq = Hq * half, n = (Hq + Hk) * half;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const bool is_q = j < nq;
    const int jj = is_q ? j : j - nq;
    const int h = jj / half, i = jj - h * half;
    T* head = (is_q ? qt : kt) + h * D;
    rotate_pair<T>(head, i, half, is_neox, cs[i], cs[half + i]);
  }
}

}  // namespace

// ---- entry points: grid (T,), block (128,) ------------------------------------------------
extern "C" __global__ void rotary_embedding_f16(
    const int* positions /* [T] */, __half* q /* [T, q_stride] */, __half* k /* [T, k_stride] */,
    const float* cos_sin_cache /* [max_pos, rot_dim] */, int q_stride, int k_stride, int Hq,
    int Hk, int D, int rot_dim, int is_neox) {
  rotary_embedding<__half>(positions, q, k, cos_sin_cache, q_stride, k_stride, Hq, Hk, D,
                      rot_dim, is_neox);
}

extern "C" __global__ void rotary_embedding_bf16(
    const int* positions /* [T] */, __nv_bfloat16* q /* [T, q_stride] */, __nv_bfloat16* k /* [T, k_stride] */,
    const float* cos_sin_cache /* [max_pos, rot_dim] */, int q_stride, int k_stride, int Hq,
    int Hk, int D, int rot_dim, int is_neox) {
  rotary_embedding<__nv_bfloat16>(positions, q, k, cos_sin_cache, q_stride, k_stride, Hq, Hk, D,
                      rot_dim, is_neox);
}

extern "C" __global__ void rotary_embedding_f32(
    const int* positions /* [T] */, float* q /* [T, q_stride] */, float* k /* [T, k_stride] */,
    const float* cos_sin_cache /* [max_pos, rot_dim] */, int q_stride, int k_stride, int Hq,
    int Hk, int D, int rot_dim, int is_neox) {
  rotary_embedding<float>(positions, q, k, cos_sin_cache, q_stride, k_stride, Hq, Hk, D,
                      rot_dim, is_neox);
}
