// Token selection from logits rows, on the device.
//
// argmax: logits [B, V] -> out [B] int32, the index of the largest value; ties go to the
//   lowest index; NaN counts as -inf (a row of only NaN gives 0).
//   Launch: grid (B,), block (256,) (a multiple of 32, up to 1024), no dynamic shared memory.
//   One block per row: each thread keeps a (value, index) best over a strided scan, then a
//   warp-shuffle and __shared__ block reduction with the tie rule above.
//
// sample_top_k_top_p: given per-row temperature [B], top_k [B] (<= 0 or >= V: off),
//   top_p [B] (>= 1: off) and one uniform u in [0, 1) per row, draw index i with
//   probability proportional to exp((l_i - max) / temperature) restricted to the top-k and
//   then the top-p (nucleus) set. temperature <= 0 means greedy (the argmax above).
//   Launch: grid (B,), block (1024,) (a multiple of 32, up to 1024), no dynamic shared memory.
//
// Why no sort: a full sort of V = 32k..256k values per row costs far more than the few
// streaming passes below. Logits are mapped to order-preserving uint32 keys, and both
// thresholds are found by a 4-pass radix select (8 bits per pass, a 256-bin histogram in
// __shared__): top-k counts elements per digit, top-p sums probability mass per digit among
// the top-k survivors and keeps the smallest set of largest keys whose mass reaches
// top_p * mass(top-k set). Exact thresholds in 4 passes each, with no iteration count that
// depends on the data (a bisection on a float threshold needs ~30 passes for the same
// answer). Elements equal to a threshold are all kept, so ties can let a few more than k
// through, as in most engines. The draw itself is one pass: each thread sums the mass of a
// contiguous chunk, a block scan gives chunk offsets, and the one thread whose chunk holds
// u * total walks its chunk. Probabilities are recomputed from the logits in each pass
// rather than stored (a row does not fit in shared memory); the passes hit L2.
#include "common.cuh"

namespace {

// Logit as float with NaN mapped to -inf.
template <typename T>
__device__ __forceinline__ float logit_at(const T* row, int i) {
  const float v = to_f32(row[i]);
  return v != v ? -INFINITY : v;
}

// Order-preserving key: a < b as floats <=> key(a) < key(b) as unsigned.
__device__ __forceinline__ unsigned key_of(float v) {
  const unsigned b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// (value, index) with "better" = larger value, then lower index.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// Block argmax of a per-thread best; every thread gets the winner. blockDim.x % 32 == 0.
__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv /* [32] */, int* si /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = v; si[warp] = i; }
  __syncthreads();
  const bool live = lane < (int)(blockDim.x >> 5);
  v = live ? sv[lane] : -INFINITY;
  i = live ? si[lane] : 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (better(ov, oi, v, i)) { v = ov; i = oi; }
  }
  __syncthreads();  // sv/si may be reused by the caller
}

template <typename T>
__device__ __forceinline__ void row_argmax(const T* row, int V, float& bv, int& bi, float* sv, int* si) {
  bv = -INFINITY;
  bi = 0x7fffffff;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = logit_at(row, i);
    if (better(v, i, bv, bi)) { bv = v; bi = i; }
  }
  block_argmax(bv, bi, sv, si);
  if (bi == 0x7fffffff) bi = 0;
}

template <typename T>
__device__ void argmax(int* __restrict__ out, const T* __restrict__ logits, int V) {
  __shared__ float sv[32];
  __shared__ int si[32];
  float bv;
  int bi;
  row_argmax<T>(logits + (long long)blockIdx.x * V, V, bv, bi, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = bi;
}

__device__ __forceinline__ float block_sum(float v, float* red /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? red[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;
}

struct SampleShared {
  float mass[256];
  unsigned count[256];
  float red[32];
  int redi[32];
  float scan[32];
  unsigned pick_digit;
  float pick_above;
};

// One radix pass over digit `shift` among elements with (key & mask) == prefix and
// key >= lo. by_mass = false: find the digit holding the `need`-th largest by count;
// true: the digit where the mass above reaches `need`. Returns the digit; `above` grows by
// the count/mass of the larger digits.
template <typename T>
__device__ unsigned radix_pass(const T* row, int V, float m, float inv_t, unsigned prefix, unsigned mask,
                               unsigned lo, int shift, bool by_mass, float need, float& above,
                               SampleShared& sh) {
  for (int d = threadIdx.x; d < 256; d += blockDim.x) { sh.mass[d] = 0.0f; sh.count[d] = 0u; }
  __syncthreads();
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = logit_at(row, i);
    const unsigned key = key_of(v);
    if ((key & mask) == prefix && key >= lo) {
      const unsigned d = (key >> shift) & 255u;
      if (by_mass) atomicAdd(&sh.mass[d], __expf((v - m) * inv_t));
      else atomicAdd(&sh.count[d], 1u);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // 256 bins: a serial walk from the top is cheap
    float acc = above;
    unsigned pick = 0, last_nonempty = 0;
    bool found = false;
    for (int d = 255; d >= 0; --d) {
      const float c = by_mass ? sh.mass[d] : (float)sh.count[d];
      if (sh.count[d] == 0u && c == 0.0f) continue;
      last_nonempty = (unsigned)d;
      if (acc + c >= need) { pick = (unsigned)d; found = true; break; }
      acc += c;
    }
    if (!found) {  // rounding left the target just out of reach: keep everything left
      pick = last_nonempty;
      acc = above;
      for (int d = 255; d > (int)pick; --d) acc += by_mass ? sh.mass[d] : (float)sh.count[d];
    }
    sh.pick_digit = pick;
    sh.pick_above = acc;
  }
  __syncthreads();
  above = sh.pick_above;
  const unsigned digit = sh.pick_digit;
  __syncthreads();
  return digit;
}

// Threshold key: the smallest key kept. by_mass as in radix_pass.
template <typename T>
__device__ unsigned radix_select(const T* row, int V, float m, float inv_t, unsigned lo, bool by_mass,
                                 float need, SampleShared& sh) {
  unsigned prefix = 0u, mask = 0u;
  float above = 0.0f;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const unsigned d = radix_pass<T>(row, V, m, inv_t, prefix, mask, lo, shift, by_mass, need, above, sh);
    prefix |= d << shift;
    mask |= 255u << shift;
  }
  return prefix;
}

template <typename T>
__device__ void sample_top_k_top_p(int* __restrict__ out,                // [B]
                                   const T* __restrict__ logits,         // [B, V]
                                   const float* __restrict__ temperature,// [B]
                                   const int* __restrict__ top_k,        // [B]
                                   const float* __restrict__ top_p,      // [B]
                                   const float* __restrict__ uniform,    // [B], in [0, 1)
                                   int V) {
  __shared__ SampleShared sh;
  const int b = blockIdx.x;
  const T* row = logits + (long long)b * V;
  float m;
  int best;
  row_argmax<T>(row, V, m, best, sh.red, sh.redi);
  const float temp = temperature[b];
  if (!(temp > 0.0f) || m == -INFINITY) {  // greedy, or nothing to sample from
    if (threadIdx.x == 0) out[b] = best;
    return;
  }
  const float inv_t = 1.0f / temp;
  unsigned lo = 0u;
  const int k = top_k[b];
  if (k > 0 && k < V) lo = radix_select<T>(row, V, m, inv_t, 0u, false, (float)k, sh);
  const float p = top_p[b];
  if (p < 1.0f) {
    float z = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float v = logit_at(row, i);
      if (key_of(v) >= lo) z += __expf((v - m) * inv_t);
    }
    z = block_sum(z, sh.red);
    const unsigned lp = radix_select<T>(row, V, m, inv_t, lo, true, p * z, sh);
    lo = lp > lo ? lp : lo;
  }

  // The draw: contiguous chunks, a block scan of chunk masses, one thread walks its chunk.
  const int chunk = (V + blockDim.x - 1) / blockDim.x;
  const int i0 = threadIdx.x * chunk;
  const int i1 = i0 + chunk < V ? i0 + chunk : V;
  float local = 0.0f;
  for (int i = i0; i < i1; ++i) {
    const float v = logit_at(row, i);
    if (key_of(v) >= lo) local += __expf((v - m) * inv_t);
  }
  float incl = local;  // inclusive scan within the warp, then across warps
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) sh.scan[warp] = incl;
  if (threadIdx.x == 0) out[b] = best;  // a fallback, overwritten by the owner below
  __syncthreads();
  float warp_off = 0.0f, total = 0.0f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
    if (w < warp) warp_off += sh.scan[w];
    total += sh.scan[w];
  }
  // excl is the previous thread's incl computed the same way, so the chunk ranges tile
  // [0, total) with no gaps or overlaps even under rounding.
  const float prev = __shfl_up_sync(0xffffffffu, incl, 1);
  const float excl = lane == 0 ? warp_off : prev + warp_off;
  incl += warp_off;
  const float target = uniform[b] * total;
  // The owner: its chunk holds the target, or it is the last non-empty chunk and rounding
  // put the target at or past the total. The last non-empty chunk is the one whose
  // inclusive sum equals the total (later chunks add exact zeros).
  const bool last_nonempty = local > 0.0f && !(incl < total);
  if (local > 0.0f && target >= excl && (target < incl || last_nonempty)) {
    float acc = excl;
    int pick = -1;
    for (int i = i0; i < i1; ++i) {
      const float v = logit_at(row, i);
      if (key_of(v) < lo) continue;
      pick = i;
      acc += __expf((v - m) * inv_t);
      if (acc > target) break;
    }
    out[b] = pick;
  }
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------
/* grid (B,), block (256,) */
extern "C" __global__ void argmax_f16(int* out /* [B] */, const __half* logits /* [B, V] */,
                                           int V) {
  argmax<__half>(out, logits, V);
}
/* grid (B,), block (1024,) */
extern "C" __global__ void sample_top_k_top_p_f16(
    int* out /* [B] */, const __half* logits /* [B, V] */, const float* temperature /* [B] */,
    const int* top_k /* [B] */, const float* top_p /* [B] */, const float* uniform /* [B] */,
    int V) {
  sample_top_k_top_p<__half>(out, logits, temperature, top_k, top_p, uniform, V);
}

/* grid (B,), block (256,) */
extern "C" __global__ void argmax_bf16(int* out /* [B] */, const __nv_bfloat16* logits /* [B, V] */,
                                           int V) {
  argmax<__nv_bfloat16>(out, logits, V);
}
/* grid (B,), block (1024,) */
extern "C" __global__ void sample_top_k_top_p_bf16(
    int* out /* [B] */, const __nv_bfloat16* logits /* [B, V] */, const float* temperature /* [B] */,
    const int* top_k /* [B] */, const float* top_p /* [B] */, const float* uniform /* [B] */,
    int V) {
  sample_top_k_top_p<__nv_bfloat16>(out, logits, temperature, top_k, top_p, uniform, V);
}

/* grid (B,), block (256,) */
extern "C" __global__ void argmax_f32(int* out /* [B] */, const float* logits /* [B, V] */,
                                           int V) {
  argmax<float>(out, logits, V);
}
/* grid (B,), block (1024,) */
extern "C" __global__ void sample_top_k_top_p_f32(
    int* out /* [B] */, const float* logits /* [B, V] */, const float* temperature /* [B] */,
    const int* top_k /* [B] */, const float* top_p /* [B] */, const float* uniform /* [B] */,
    int V) {
  sample_top_k_top_p<float>(out, logits, temperature, top_k, top_p, uniform, V);
}
