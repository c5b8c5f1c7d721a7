// Paged attention, decode: one query token per sequence against its paged K/V cache.
//
// Design note
// -----------
// Layouts (see cupaged/backend/ops.py): q, out [B, Hq, D]; k_cache, v_cache [NB, BS, Hk, D];
// block_tables [B, MB] int32; seq_lens [B] int32 (context length, the query token included).
//
// GQA: one thread block serves GP query heads of one KV head (GP = the smallest of 1, 2, 4, 8
// that is >= min(G, 8), G = Hq / Hk), so every K/V row a block loads is used by all its
// heads straight from registers: each K/V element is read from memory once per block (twice
// only when G > 8, where ceil(G / 8) blocks share a KV head and the second read hits L2).
//
// Launch: grid = (Hk * ceil(G / GP), B, P), block = 128 threads (4 warps).
//   P = ceil(min(max_seq_len, window or inf) / partition_size) partitions (flash-decoding).
//   A sequence's keys [lo, seq_len) (lo = seq_len - window with a sliding window, else 0)
//   are cut into partitions of partition_size keys; blockIdx.z picks one. A sequence that
//   needs one partition writes `out` directly (single pass); otherwise each partition
//   writes fp32 partials (max and sum in the log2 domain, and the normalised output) and
//   paged_decode_reduce_* merges them. partition_size is a runtime int (512 on a GPU; tests
//   use 64 so emulation stays small).
//
// Inside a block: a K/V row (D elements, D/8 chunks of 16 bytes) is read by a group of
// L = next_pow2(D/8) lanes, one uint4 per lane (lanes >= D/8 idle for D = 80, 96). A warp
// thus holds 32/L "key slots", the block NSLOT = 4 * 32/L. Each slot runs its own online
// softmax over keys slot, slot + NSLOT, ... (KU = 2 keys per step, so 4 loads are in
// flight per thread), keeping q (fp32, pre-scaled by scale*log2 e), running max/sum and the
// output chunk for all GP heads in registers. Scores are reduced over the L lanes with
// __shfl_xor_sync. There is no barrier in the key loop: the loop trip count is uniform and
// keys past the end are masked. At the end slots merge within a warp by shuffles, then
// across the 4 warps through shared memory.
//
// Dynamic shared memory (one extern array, floats):
//   decode: 4 * GP * (D + 2) * 4 bytes  = [4 warps][GP][D] outputs + [4][GP] max + [4][GP] sum
//   reduce: P * 4 bytes                 = one merge weight per partition
//
// Entry points: paged_decode_{f16,bf16}_d{64,80,96,128,256}_g{1,2,4,8} and
// paged_decode_reduce_{f16,bf16} (grid = (Hq, B), block = 128).
#include "common.cuh"

// The one dynamic shared array of both kernels (file scope: the host emulator links it by name).
extern __shared__ float decode_smem[];

namespace cupaged_decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;


template <class E>
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = E::to_f(w[i] & 0xffffu);
    f[2 * i + 1] = E::to_f(w[i] >> 16);
  }
}

template <class E>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 u;
  u.x = E::bits(f[0]) | (E::bits(f[1]) << 16);
  u.y = E::bits(f[2]) | (E::bits(f[3]) << 16);
  u.z = E::bits(f[4]) | (E::bits(f[5]) << 16);
  u.w = E::bits(f[6]) | (E::bits(f[7]) << 16);
  return u;
}

// Key range [lo, hi) of sequence b, and how many partitions of `ps` keys it needs.
__device__ __forceinline__ int key_range(const int* seq_lens, int b, int window, int ps, int& lo, int& hi) {
  hi = seq_lens[b];
  lo = window > 0 ? max(0, hi - window) : 0;
  return hi > lo ? (hi - lo + ps - 1) / ps : 0;
}

template <class E, int D, int GP>
__device__ __forceinline__ void decode(typename E::T* __restrict__ out, const typename E::T* __restrict__ q,
                                       const typename E::T* __restrict__ k_cache,
                                       const typename E::T* __restrict__ v_cache, const int* __restrict__ block_tables,
                                       const int* __restrict__ seq_lens, float* __restrict__ part_max,
                                       float* __restrict__ part_sum, float* __restrict__ part_out, int num_q_heads,
                                       int num_kv_heads, int max_blocks, int block_size, int partition_size,
                                       float scale, int window) {
  constexpr int CH = D / 8;                                 // 16-byte chunks per row
  constexpr int L = CH <= 8 ? 8 : (CH <= 16 ? 16 : 32);    // lanes per key slot
  constexpr int SPW = 32 / L;                               // key slots per warp
  constexpr int NSLOT = kWarps * SPW;
  constexpr int KU = 2;                                     // keys per slot per step

  const int G = num_q_heads / num_kv_heads;
  const int ngrp = (G + GP - 1) / GP;
  const int kvh = blockIdx.x / ngrp;
  const int g0 = (blockIdx.x % ngrp) * GP;
  const int b = blockIdx.y, part = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = lane & (L - 1);
  const int slot = warp * SPW + lane / L;
  const bool active = c < CH;

  int lo, hi;
  const int nparts = key_range(seq_lens, b, window, partition_size, lo, hi);
  if (part >= max(nparts, 1)) return;  // uniform over the block
  const int k_lo = lo + part * partition_size;
  const int k_n = max(0, min(hi, k_lo + partition_size) - k_lo);
  int bs_log2 = 0;
  while ((1 << bs_log2) < block_size) ++bs_log2;
  const int* table = block_tables + (long long)b * max_blocks;

  float qf[GP][8];
  const float qscale = scale * kLog2e;
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    uint4 u = make_uint4(0u, 0u, 0u, 0u);
    if (active && g0 + g < G)
      u = *reinterpret_cast<const uint4*>(q + ((long long)b * num_q_heads + kvh * G + g0 + g) * D + c * 8);
    unpack8<E>(u, qf[g]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[g][e] *= qscale;
  }

  float m[GP], l[GP], acc[GP][8];
#pragma unroll
  for (int g = 0; g < GP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }

  for (int base = 0; base < k_n; base += NSLOT * KU) {  // uniform trip count: shuffles stay full-warp
    uint4 kr[KU], vr[KU];
    bool valid[KU];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int t = base + u * NSLOT + slot;
      valid[u] = t < k_n;
      kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (valid[u] && active) {
        const int pos = k_lo + t;
        const long long blk = table[pos >> bs_log2];
        const long long off = ((blk * block_size + (pos & (block_size - 1))) * num_kv_heads + kvh) * D + c * 8;
        kr[u] = *reinterpret_cast<const uint4*>(k_cache + off);
        vr[u] = *reinterpret_cast<const uint4*>(v_cache + off);
      }
    }
    float s[KU][GP];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      float kf[8];
      unpack8<E>(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GP; ++g) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) a = fmaf(qf[g][e], kf[e], a);
        s[u][g] = a;
      }
    }
#pragma unroll
    for (int off = L / 2; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < KU; ++u)
#pragma unroll
        for (int g = 0; g < GP; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
    float vf[KU][8];
#pragma unroll
    for (int u = 0; u < KU; ++u) unpack8<E>(vr[u], vf[u]);
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      float mn = m[g];
#pragma unroll
      for (int u = 0; u < KU; ++u) mn = valid[u] ? fmaxf(mn, s[u][g]) : mn;
      const float ref = mn == -INFINITY ? 0.f : mn;  // no valid key yet: keep everything 0
      const float alpha = exp2f(m[g] - ref);
      float p[KU];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        p[u] = valid[u] ? exp2f(s[u][g] - ref) : 0.f;
        psum += p[u];
      }
      l[g] = l[g] * alpha + psum;
      m[g] = mn;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = acc[g][e] * alpha;
#pragma unroll
        for (int u = 0; u < KU; ++u) a = fmaf(p[u], vf[u][e], a);
        acc[g][e] = a;
      }
    }
  }

  // Merge the key slots of each warp (butterfly over lane distances L, 2L, ...).
#pragma unroll
  for (int off = L; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float lo_ = __shfl_xor_sync(0xffffffffu, l[g], off);
      const float mn = fmaxf(m[g], mo);
      const float ref = mn == -INFINITY ? 0.f : mn;
      const float a = exp2f(m[g] - ref), bb = exp2f(mo - ref);
      l[g] = l[g] * a + lo_ * bb;
      m[g] = mn;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] = acc[g][e] * a + __shfl_xor_sync(0xffffffffu, acc[g][e], off) * bb;
    }
  }
  float* red_o = decode_smem;                            // [4][GP][D]
  float* red_m = decode_smem + kWarps * GP * D;          // [4][GP]
  float* red_l = red_m + kWarps * GP;             // [4][GP]
  if (lane < L && active) {
#pragma unroll
    for (int g = 0; g < GP; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) red_o[(warp * GP + g) * D + c * 8 + e] = acc[g][e];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GP; ++g) {
      red_m[warp * GP + g] = m[g];
      red_l[warp * GP + g] = l[g];
    }
  }
  __syncthreads();

  // Merge the 4 warps: one thread per (head, 16-byte chunk).
  const int P = gridDim.z;
  for (int idx = threadIdx.x; idx < GP * CH; idx += kThreads) {
    const int g = idx / CH, cc = idx % CH;
    if (g0 + g >= G) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, red_m[w * GP + g]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float a = exp2f(red_m[w * GP + g] - ref);
      sum += red_l[w * GP + g] * a;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] += red_o[(w * GP + g) * D + cc * 8 + e] * a;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const long long row = (long long)b * num_q_heads + kvh * G + g0 + g;
    if (nparts <= 1) {
      *reinterpret_cast<uint4*>(out + row * D + cc * 8) = pack8<E>(o);
    } else {
      const long long pi = row * P + part;
#pragma unroll
      for (int e = 0; e < 8; ++e) part_out[pi * D + cc * 8 + e] = o[e];
      if (cc == 0) {
        part_max[pi] = mx;
        part_sum[pi] = sum;
      }
    }
  }
}

// Merge the partitions of one (sequence, query head); sequences with <= 1 partition were
// written by the decode kernel and are skipped.
template <class E>
__device__ __forceinline__ void reduce(typename E::T* __restrict__ out, const float* __restrict__ part_max,
                                       const float* __restrict__ part_sum, const float* __restrict__ part_out,
                                       const int* __restrict__ seq_lens, int num_q_heads, int head_dim,
                                       int num_partitions, int partition_size, int window) {
  float* weights = decode_smem;  // [num_partitions]
  const int h = blockIdx.x, b = blockIdx.y;
  int lo, hi;
  const int np = key_range(seq_lens, b, window, partition_size, lo, hi);
  if (np <= 1) return;  // uniform over the block
  const long long row = (long long)b * num_q_heads + h;
  const long long p0 = row * num_partitions;
  float mx = -INFINITY;
  for (int p = 0; p < np; ++p) mx = fmaxf(mx, part_max[p0 + p]);
  for (int p = threadIdx.x; p < np; p += kThreads) weights[p] = part_sum[p0 + p] * exp2f(part_max[p0 + p] - mx);
  __syncthreads();
  float total = 0.f;
  for (int p = 0; p < np; ++p) total += weights[p];
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float o = 0.f;
    for (int p = 0; p < np; ++p) o += weights[p] * part_out[(p0 + p) * head_dim + d];
    reinterpret_cast<unsigned short*>(out)[row * head_dim + d] = (unsigned short)E::bits(o * inv);
  }
}

}  // namespace cupaged_decode

// Entry points. Parameters (shapes in the design note):
//   out [B, Hq, D], q [B, Hq, D], k_cache / v_cache [NB, BS, Hk, D], block_tables [B, MB],
//   seq_lens [B], part_max / part_sum [B, Hq, P] (log2 domain), part_out [B, Hq, P, D]
//   (the three partial buffers are unused when P == 1).
#define DECODE_PARAMS(T)                                                                                        \
  T *out, const T *q, const T *k_cache, const T *v_cache, const int *block_tables, const int *seq_lens,          \
      float *part_max, float *part_sum, float *part_out, int num_q_heads, int num_kv_heads, int max_blocks,      \
      int block_size, int partition_size, float scale, int window
#define DECODE_ARGS                                                                                             \
  out, q, k_cache, v_cache, block_tables, seq_lens, part_max, part_sum, part_out, num_q_heads, num_kv_heads,     \
      max_blocks, block_size, partition_size, scale, window
#define DECODE(E, D, GP) cupaged_decode::decode<::E, D, GP>(DECODE_ARGS)
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d64_g1(DECODE_PARAMS(__half)) { DECODE(F16, 64, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d64_g2(DECODE_PARAMS(__half)) { DECODE(F16, 64, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d64_g4(DECODE_PARAMS(__half)) { DECODE(F16, 64, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d64_g8(DECODE_PARAMS(__half)) { DECODE(F16, 64, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d80_g1(DECODE_PARAMS(__half)) { DECODE(F16, 80, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d80_g2(DECODE_PARAMS(__half)) { DECODE(F16, 80, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d80_g4(DECODE_PARAMS(__half)) { DECODE(F16, 80, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d80_g8(DECODE_PARAMS(__half)) { DECODE(F16, 80, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d96_g1(DECODE_PARAMS(__half)) { DECODE(F16, 96, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d96_g2(DECODE_PARAMS(__half)) { DECODE(F16, 96, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d96_g4(DECODE_PARAMS(__half)) { DECODE(F16, 96, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d96_g8(DECODE_PARAMS(__half)) { DECODE(F16, 96, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d128_g1(DECODE_PARAMS(__half)) { DECODE(F16, 128, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d128_g2(DECODE_PARAMS(__half)) { DECODE(F16, 128, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d128_g4(DECODE_PARAMS(__half)) { DECODE(F16, 128, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d128_g8(DECODE_PARAMS(__half)) { DECODE(F16, 128, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d256_g1(DECODE_PARAMS(__half)) { DECODE(F16, 256, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d256_g2(DECODE_PARAMS(__half)) { DECODE(F16, 256, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d256_g4(DECODE_PARAMS(__half)) { DECODE(F16, 256, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_f16_d256_g8(DECODE_PARAMS(__half)) { DECODE(F16, 256, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d64_g1(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 64, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d64_g2(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 64, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d64_g4(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 64, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d64_g8(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 64, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d80_g1(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 80, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d80_g2(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 80, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d80_g4(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 80, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d80_g8(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 80, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d96_g1(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 96, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d96_g2(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 96, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d96_g4(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 96, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d96_g8(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 96, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d128_g1(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 128, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d128_g2(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 128, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d128_g4(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 128, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d128_g8(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 128, 8); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d256_g1(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 256, 1); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d256_g2(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 256, 2); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d256_g4(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 256, 4); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_bf16_d256_g8(DECODE_PARAMS(__nv_bfloat16)) { DECODE(BF16, 256, 8); }

// out [B, Hq, D]; part_max / part_sum [B, Hq, P]; part_out [B, Hq, P, D]; seq_lens [B].
#define REDUCE_PARAMS(T)                                                                                  \
  T *out, const float *part_max, const float *part_sum, const float *part_out, const int *seq_lens,       \
      int num_q_heads, int head_dim, int num_partitions, int partition_size, int window
#define REDUCE_ARGS out, part_max, part_sum, part_out, seq_lens, num_q_heads, head_dim, num_partitions, partition_size, window
extern "C" __global__ void __launch_bounds__(128) paged_decode_reduce_f16(REDUCE_PARAMS(__half)) { cupaged_decode::reduce<::F16>(REDUCE_ARGS); }
extern "C" __global__ void __launch_bounds__(128) paged_decode_reduce_bf16(REDUCE_PARAMS(__nv_bfloat16)) { cupaged_decode::reduce<::BF16>(REDUCE_ARGS); }
