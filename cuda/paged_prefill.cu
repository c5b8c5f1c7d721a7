// Paged attention, prefill and chunked prefill (and mixed batches: a decode is q_len 1).
//
// Design note
// -----------
// Layouts (see cupaged/backend/ops.py): q, out [T, Hq, D] packed varlen; query_start_loc
// [B + 1] int32; k_cache, v_cache [NB, BS, Hk, D]; block_tables [B, MB]; seq_lens [B].
// Query i of sequence b sits at position seq_lens[b] - q_len_b + i and attends to cached
// keys at positions <= its own (its own new K/V are already in the cache), and within the
// last `window` positions when window > 0.
//
// GQA: a tile packs the G = Hq / Hk query heads of one KV head for consecutive tokens
// (row r = token * G + g), so each K/V tile loaded into shared memory serves all heads.
//
// Launch: grid = (ceil(max_query_len * G / BM), Hk, B), block = 128 threads.
//   BM = 64 query rows (32 for D = 256), BN = 32 keys per tile (16 for D = 256).
//   A block whose rows lie past its sequence's q_len * G exits at once (uniformly), so
//   decode rows in a mixed batch cost one near-empty block per KV head.
// FlashAttention-style: Q tile in shared memory; loop over key tiles [BN] of the block's key
// range (from the window start of its first row to the position of its last row): load K
// and V tiles through the block table with 16-byte loads, S = Q K^T in registers
// (thread = 4 x 8 grid position: rows rg + 16 i, keys cg + 8 j), online softmax per row
// (row max/sum over the 8 lanes of a row by __shfl_xor_sync), P through shared memory (a P
// row is written and read by the 8 lanes of one warp, so __syncwarp orders it),
// O += P V in registers (rows rg + 16 i, feature pairs cg + 8 j). fp32 accumulation, no
// score matrix beyond one [BM, BN] tile. Scalar FMA, no tensor cores (WMMA is the next step).
//
// Dynamic shared memory, one extern array of 32-bit words (exact size, bytes):
//   (BM + 2 * BN) * (D + 8) * 2          Q, K, V tiles as 16-bit elements, rows padded by 8
//                                        elements (bank-conflict-free, 16-byte aligned rows)
// + BM * (BN + 1) * 4                    P tile, fp32, rows padded by 1
//   D=64: 26880, D=80: 30976, D=96: 35072, D=128: 43264, D=256: 35968.
//
// Entry points: paged_prefill_{f16,bf16}_d{64,80,96,128,256}. block_size is a runtime
// power of two (8, 16, 32 ...).
#include "common.cuh"

// The one dynamic shared array (file scope: the host emulator links it by name).
extern __shared__ unsigned int prefill_smem[];

namespace cupaged_prefill {

constexpr int kThreads = 128;


template <int D> struct Tile {
  static constexpr int BM = D > 128 ? 32 : 64;  // query rows
  static constexpr int BN = D > 128 ? 16 : 32;  // keys
  static constexpr int RM = BM / 16;            // rows per thread
  static constexpr int CN = BN / 8;             // keys per thread
  static constexpr int NP = D / 16;             // feature pairs per thread
  static constexpr int CH = D / 8;              // 16-byte chunks per row
  static constexpr int W = (D + 8) / 2;         // words per padded Q/K/V row
  static constexpr int PW = BN + 1;             // floats per padded P row
};

// Global 16-byte chunk -> 4 shared words (the tiles are only ever accessed as words).
__device__ __forceinline__ void put4(unsigned int* dst, const uint4& u) {
  dst[0] = u.x;
  dst[1] = u.y;
  dst[2] = u.z;
  dst[3] = u.w;
}

template <class E, int D>
__device__ __forceinline__ void prefill(typename E::T* __restrict__ out, const typename E::T* __restrict__ q,
                                        const typename E::T* __restrict__ k_cache,
                                        const typename E::T* __restrict__ v_cache,
                                        const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
                                        const int* __restrict__ query_start_loc, int num_q_heads, int num_kv_heads,
                                        int max_blocks, int block_size, float scale, int window) {
  typedef Tile<D> C;
  unsigned int* qs = prefill_smem;        // [BM][W]
  unsigned int* ks = qs + C::BM * C::W;   // [BN][W]
  unsigned int* vs = ks + C::BN * C::W;   // [BN][W]
  float* ps = reinterpret_cast<float*>(vs + C::BN * C::W);  // [BM][PW]

  const int G = num_q_heads / num_kv_heads;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int q0 = query_start_loc[b];
  const int q_len = query_start_loc[b + 1] - q0;
  const int rows = q_len * G;
  const int r0 = blockIdx.x * C::BM;
  if (r0 >= rows) return;  // uniform over the block
  const int first_pos = seq_lens[b] - q_len;
  const int last_row = min(r0 + C::BM, rows) - 1;
  const int pos_lo = first_pos + r0 / G, pos_hi = first_pos + last_row / G;
  const int kv_lo = window > 0 ? max(0, pos_lo - window + 1) : 0;
  const int kv_hi = pos_hi + 1;
  int bs_log2 = 0;
  while ((1 << bs_log2) < block_size) ++bs_log2;
  const int* table = block_tables + (long long)b * max_blocks;
  const int tid = threadIdx.x, rg = tid >> 3, cg = tid & 7;

  // Q tile (rows past the sequence are zero).
  for (int i = tid; i < C::BM * C::CH; i += kThreads) {
    const int r = i / C::CH, ch = i % C::CH, row = r0 + r;
    uint4 u = make_uint4(0u, 0u, 0u, 0u);
    if (row < rows)
      u = *reinterpret_cast<const uint4*>(q + ((long long)(q0 + row / G) * num_q_heads + kvh * G + row % G) * D +
                                          ch * 8);
    put4(qs + r * C::W + ch * 4, u);
  }

  int pos[C::RM];
  float m[C::RM], l[C::RM], acc[C::RM][C::NP][2];
#pragma unroll
  for (int i = 0; i < C::RM; ++i) {
    const int row = r0 + rg + 16 * i;
    pos[i] = row < rows ? first_pos + row / G : -1;  // -1: padding row, every key masked
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < C::NP; ++j) acc[i][j][0] = acc[i][j][1] = 0.f;
  }
  const float qk_scale = scale * kLog2e;

  for (int k0 = kv_lo; k0 < kv_hi; k0 += C::BN) {
    __syncthreads();  // the previous tile's P V is done before K, V, P are overwritten
    for (int i = tid; i < C::BN * C::CH; i += kThreads) {
      const int c = i / C::CH, ch = i % C::CH, key = k0 + c;
      uint4 ku = make_uint4(0u, 0u, 0u, 0u), vu = ku;
      if (key < kv_hi) {
        const long long blk = table[key >> bs_log2];
        const long long off = ((blk * block_size + (key & (block_size - 1))) * num_kv_heads + kvh) * D + ch * 8;
        ku = *reinterpret_cast<const uint4*>(k_cache + off);
        vu = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      put4(ks + c * C::W + ch * 4, ku);
      put4(vs + c * C::W + ch * 4, vu);
    }
    __syncthreads();

    float s[C::RM][C::CN];
#pragma unroll
    for (int i = 0; i < C::RM; ++i)
#pragma unroll
      for (int j = 0; j < C::CN; ++j) s[i][j] = 0.f;
#pragma unroll 4
    for (int w = 0; w < D / 2; ++w) {
      float qa[C::RM], qb[C::RM];
#pragma unroll
      for (int i = 0; i < C::RM; ++i) {
        const unsigned int x = qs[(rg + 16 * i) * C::W + w];
        qa[i] = E::to_f(x & 0xffffu);
        qb[i] = E::to_f(x >> 16);
      }
#pragma unroll
      for (int j = 0; j < C::CN; ++j) {
        const unsigned int x = ks[(cg + 8 * j) * C::W + w];
        const float ka = E::to_f(x & 0xffffu), kb = E::to_f(x >> 16);
#pragma unroll
        for (int i = 0; i < C::RM; ++i) s[i][j] = fmaf(qa[i], ka, fmaf(qb[i], kb, s[i][j]));
      }
    }

    // Online softmax per row; the 8 lanes cg = 0..7 of a row are adjacent in one warp.
#pragma unroll
    for (int i = 0; i < C::RM; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < C::CN; ++j) {
        const int key = k0 + cg + 8 * j;
        const bool ok = key <= pos[i] && (window <= 0 || key > pos[i] - window);
        s[i][j] = ok ? s[i][j] * qk_scale : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
#pragma unroll
      for (int off = 1; off < 8; off *= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float mn = fmaxf(m[i], mx);
      const float ref = mn == -INFINITY ? 0.f : mn;
      const float alpha = exp2f(m[i] - ref);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < C::CN; ++j) {
        const float p = exp2f(s[i][j] - ref);  // exp2(-inf) = 0 for masked keys
        ps[(rg + 16 * i) * C::PW + cg + 8 * j] = p;
        sum += p;
      }
#pragma unroll
      for (int off = 1; off < 8; off *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      l[i] = l[i] * alpha + sum;
      m[i] = mn;
#pragma unroll
      for (int j = 0; j < C::NP; ++j) {
        acc[i][j][0] *= alpha;
        acc[i][j][1] *= alpha;
      }
    }
    __syncwarp();  // a P row is written and read only by the 8 lanes of its own warp

    const int n_keys = min(C::BN, kv_hi - k0);
    for (int c = 0; c < n_keys; ++c) {
      float p[C::RM];
#pragma unroll
      for (int i = 0; i < C::RM; ++i) p[i] = ps[(rg + 16 * i) * C::PW + c];
#pragma unroll
      for (int j = 0; j < C::NP; ++j) {
        const unsigned int x = vs[c * C::W + cg + 8 * j];
        const float va = E::to_f(x & 0xffffu), vb = E::to_f(x >> 16);
#pragma unroll
        for (int i = 0; i < C::RM; ++i) {
          acc[i][j][0] = fmaf(p[i], va, acc[i][j][0]);
          acc[i][j][1] = fmaf(p[i], vb, acc[i][j][1]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < C::RM; ++i) {
    const int row = r0 + rg + 16 * i;
    if (row >= rows) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    unsigned int* dst = reinterpret_cast<unsigned int*>(
        out + ((long long)(q0 + row / G) * num_q_heads + kvh * G + row % G) * D);
#pragma unroll
    for (int j = 0; j < C::NP; ++j)
      dst[cg + 8 * j] = E::bits(acc[i][j][0] * inv) | (E::bits(acc[i][j][1] * inv) << 16);
  }
}

}  // namespace cupaged_prefill

// Entry points: out [T, Hq, D], q [T, Hq, D], k_cache / v_cache [NB, BS, Hk, D],
// block_tables [B, MB], seq_lens [B], query_start_loc [B + 1].
#define PREFILL_PARAMS(T)                                                                                    \
  T *out, const T *q, const T *k_cache, const T *v_cache, const int *block_tables, const int *seq_lens,       \
      const int *query_start_loc, int num_q_heads, int num_kv_heads, int max_blocks, int block_size,         \
      float scale, int window
#define PREFILL(E, D)                                                                                        \
  cupaged_prefill::prefill<::E, D>(out, q, k_cache, v_cache, block_tables, seq_lens,          \
                                                  query_start_loc, num_q_heads, num_kv_heads, max_blocks,    \
                                                  block_size, scale, window)
extern "C" __global__ void __launch_bounds__(128) paged_prefill_f16_d64(PREFILL_PARAMS(__half)) { PREFILL(F16, 64); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_f16_d80(PREFILL_PARAMS(__half)) { PREFILL(F16, 80); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_f16_d96(PREFILL_PARAMS(__half)) { PREFILL(F16, 96); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_f16_d128(PREFILL_PARAMS(__half)) { PREFILL(F16, 128); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_f16_d256(PREFILL_PARAMS(__half)) { PREFILL(F16, 256); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_bf16_d64(PREFILL_PARAMS(__nv_bfloat16)) { PREFILL(BF16, 64); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_bf16_d80(PREFILL_PARAMS(__nv_bfloat16)) { PREFILL(BF16, 80); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_bf16_d96(PREFILL_PARAMS(__nv_bfloat16)) { PREFILL(BF16, 96); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_bf16_d128(PREFILL_PARAMS(__nv_bfloat16)) { PREFILL(BF16, 128); }
extern "C" __global__ void __launch_bounds__(128) paged_prefill_bf16_d256(PREFILL_PARAMS(__nv_bfloat16)) { PREFILL(BF16, 256); }
