// cuda_emu.h -- force-included (g++ -include) before a cuda/*.cu file so the *same* source runs on
// the CPU. Each CUDA thread is a fiber (own mmap'd stack, hand-written x86-64 switch); one OS thread
// runs one block at a time, so __shared__ is thread_local. Blocks are spread over worker threads.
// Collectives and barriers yield to a per-block scheduler that checks CUDA's rules and reports
// violations (divergent barriers, exited lanes, bad masks) as launch errors instead of hanging.
#pragma once
// Standard headers first: the CUDA keyword macros below (e.g. __noinline__) break libstdc++.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <link.h>
#include <sys/mman.h>
#if defined(__x86_64__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr: flush denormals as -ftz=true does
#endif
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#undef __shared__
#undef __global__
#undef __device__
#undef __host__
#undef __constant__
#undef __noinline__
#undef __forceinline__
#undef __managed__
#define __shared__ thread_local
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

namespace emu {
constexpr int kWarp = 32;
constexpr size_t kMaxDynSmem = 227 * 1024;
enum State : int { RUN, BAR, WARP, DONE };
enum Op : int { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP, RED_ADD, RED_MIN,
                RED_MAX, RED_UMIN, RED_UMAX, MATCH_ANY };
static const char* const kOpName[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
    "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp", "__reduce_add_sync", "__reduce_min_sync",
    "__reduce_max_sync", "__reduce_min_sync", "__reduce_max_sync", "__match_any_sync"};

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  uint3 tid;
  int lin = 0, state = RUN, line = 0;
  // warp-collective slot
  int op = 0, arg = 0, width = 32;
  unsigned mask = 0;
  uint64_t val = 0, res = 0;
  int bar_pred = 0;
  void* fake_stack = nullptr;
};

struct Launch;
struct Worker {
  Launch* L = nullptr;
  Fiber* cur = nullptr;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  void* sched_sp = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake = nullptr;
  uint3 bidx;
  dim3 bdim, gdim;
  int nthreads = 0, bar_count = 0;
  bool abort = false;
  ~Worker() { if (stacks) munmap(stacks, stacks_bytes); }
};

struct Launch {
  dim3 grid, block;
  size_t shmem = 0;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::atomic<long> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
};

inline thread_local Worker* tls_w = nullptr;
inline int g_schedule = 0;  // 0 interleaved, 1 warp-serial, 2 reverse
inline int g_workers = 0;   // 0: hardware concurrency
inline std::string g_last_error;

#if EMU_ASAN
constexpr size_t kStack = 256 * 1024;
#else
constexpr size_t kStack = 64 * 1024;
#endif
constexpr size_t kGuard = 4096;

inline void fail(const char* fmt, ...) {
  Worker* w = tls_w;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  char where[128];
  snprintf(where, sizeof where, "block (%u,%u,%u): ", w->bidx.x, w->bidx.y, w->bidx.z);
  std::lock_guard<std::mutex> g(w->L->mu);
  if (!w->L->failed.exchange(true)) w->L->error = std::string(where) + buf;
  w->abort = true;
}
}  // namespace emu

// ---- context switch: emu_switch(void** save_sp, void* new_sp) saves callee-saved regs -------------
extern "C" void emu_switch(void** save, void* to);
asm(R"(
.text
.p2align 4
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_switch,.-emu_switch
)");

namespace emu {
inline void to_sched(Fiber* f, bool exiting) {
  Worker* w = tls_w;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->fake_stack, w->sched_stack_bottom, w->sched_stack_size);
#else
  (void)exiting;
#endif
  emu_switch(&f->sp, w->sched_sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
  Worker* w = tls_w;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w->sched_stack_bottom, &w->sched_stack_size);
#endif
  w->L->body(w->L->ctx);
  Fiber* f = w->cur;
  f->state = DONE;
  to_sched(f, true);
  __builtin_trap();  // never resumed
}

inline void resume(Worker* w, Fiber* f) {
  w->cur = f;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&w->sched_fake, f->stack, kStack);
#endif
  emu_switch(&w->sched_sp, f->sp);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(w->sched_fake, nullptr, nullptr);
#endif
  w->cur = nullptr;
}

// Called from a fiber: block until the scheduler resumes us.
inline void block_on(int state, int line) {
  Fiber* f = tls_w->cur;
  f->state = state;
  f->line = line;
  to_sched(f, false);
  if (tls_w->abort) {  // the launch failed while we waited: never return into the kernel
    f->state = DONE;
    to_sched(f, true);
  }
}
}  // namespace emu

// ---- built-in variables -----------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::emu::tls_w->cur->tid))
#define blockIdx (static_cast<const uint3&>(::emu::tls_w->bidx))
#define blockDim (static_cast<const dim3&>(::emu::tls_w->bdim))
#define gridDim (static_cast<const dim3&>(::emu::tls_w->gdim))
#ifndef warpSize
#define warpSize 32
#endif

// ---- barriers ---------------------------------------------------------------------------------------
inline int emu_bar(int pred, int line) {
  ::emu::tls_w->cur->bar_pred = pred != 0;
  ::emu::block_on(::emu::BAR, line);
  return ::emu::tls_w->bar_count;
}
inline void __syncthreads(int line = __builtin_LINE()) { emu_bar(0, line); }
inline int __syncthreads_count(int p, int line = __builtin_LINE()) { return emu_bar(p, line); }
inline int __syncthreads_and(int p, int line = __builtin_LINE()) {
  return emu_bar(p, line) == ::emu::tls_w->nthreads;
}
inline int __syncthreads_or(int p, int line = __builtin_LINE()) { return emu_bar(p, line) != 0; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- warp collectives: deposit, yield, read the scheduler's answer ---------------------------------
inline uint64_t emu_coll(int op, unsigned mask, uint64_t val, int arg, int width, int line) {
  emu::Fiber* f = emu::tls_w->cur;
  int lane = f->lin % emu::kWarp;
  if (!(mask >> lane & 1u)) {
    emu::fail("thread %d calls %s (line %d) with mask 0x%08x that excludes its own lane %d", f->lin,
              emu::kOpName[op], line, mask, lane);
    emu::block_on(emu::DONE, line);
  }
  if (width < 1 || width > 32 || (width & (width - 1))) {
    emu::fail("thread %d: %s (line %d) width %d is not a power of two in [1, 32]", f->lin, emu::kOpName[op],
              line, width);
    emu::block_on(emu::DONE, line);
  }
  f->op = op; f->mask = mask; f->val = val; f->arg = arg; f->width = width;
  emu::block_on(emu::WARP, line);
  return f->res;
}
template <class T> inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, static_cast<const void*>(&v), sizeof(T));
  return b;
}
template <class T> inline T emu_from_bits(uint64_t b) { T v; std::memcpy(static_cast<void*>(&v), &b, sizeof(T)); return v; }
template <class T> inline T __shfl_sync(unsigned m, T v, int src, int w = 32, int line = __builtin_LINE()) {
  return emu_from_bits<T>(emu_coll(emu::SHFL_IDX, m, emu_bits(v), src, w, line));
}
template <class T> inline T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32, int line = __builtin_LINE()) {
  return emu_from_bits<T>(emu_coll(emu::SHFL_UP, m, emu_bits(v), (int)d, w, line));
}
template <class T> inline T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32, int line = __builtin_LINE()) {
  return emu_from_bits<T>(emu_coll(emu::SHFL_DOWN, m, emu_bits(v), (int)d, w, line));
}
template <class T> inline T __shfl_xor_sync(unsigned m, T v, int x, int w = 32, int line = __builtin_LINE()) {
  return emu_from_bits<T>(emu_coll(emu::SHFL_XOR, m, emu_bits(v), x, w, line));
}
inline unsigned __ballot_sync(unsigned m, int p, int line = __builtin_LINE()) {
  return (unsigned)emu_coll(emu::BALLOT, m, p != 0, 0, 32, line);
}
inline int __any_sync(unsigned m, int p, int line = __builtin_LINE()) { return (int)emu_coll(emu::ANY, m, p != 0, 0, 32, line); }
inline int __all_sync(unsigned m, int p, int line = __builtin_LINE()) { return (int)emu_coll(emu::ALL, m, p != 0, 0, 32, line); }
inline void __syncwarp(unsigned m = 0xffffffffu, int line = __builtin_LINE()) { emu_coll(emu::SYNCWARP, m, 0, 0, 32, line); }
inline unsigned __reduce_add_sync(unsigned m, unsigned v, int line = __builtin_LINE()) { return (unsigned)emu_coll(emu::RED_ADD, m, v, 0, 32, line); }
inline int __reduce_add_sync(unsigned m, int v, int line = __builtin_LINE()) { return (int)emu_coll(emu::RED_ADD, m, (uint32_t)v, 0, 32, line); }
inline unsigned __reduce_min_sync(unsigned m, unsigned v, int line = __builtin_LINE()) { return (unsigned)emu_coll(emu::RED_UMIN, m, v, 0, 32, line); }
inline unsigned __reduce_max_sync(unsigned m, unsigned v, int line = __builtin_LINE()) { return (unsigned)emu_coll(emu::RED_UMAX, m, v, 0, 32, line); }
inline int __reduce_min_sync(unsigned m, int v, int line = __builtin_LINE()) { return (int)emu_coll(emu::RED_MIN, m, (uint32_t)v, 0, 32, line); }
inline int __reduce_max_sync(unsigned m, int v, int line = __builtin_LINE()) { return (int)emu_coll(emu::RED_MAX, m, (uint32_t)v, 0, 32, line); }
template <class T> inline unsigned __match_any_sync(unsigned m, T v, int line = __builtin_LINE()) {
  return (unsigned)emu_coll(emu::MATCH_ANY, m, emu_bits(v), 0, 32, line);
}
inline unsigned __activemask() {
  unsigned m = 0;
  emu::Worker* w = emu::tls_w;
  int base = w->cur->lin / 32 * 32;
  for (int l = 0; l < 32 && base + l < w->nthreads; ++l)
    if (w->fibers[base + l].state != emu::DONE) m |= 1u << l;
  return m;
}
inline unsigned __lanemask_lt() { return (1u << (emu::tls_w->cur->lin % 32)) - 1u; }

// ---- math intrinsics (host versions; fast-math variants are computed exactly) ----------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }

// ---- atomics (blocks run concurrently on worker threads) -------------------------------------------
template <class T> inline T emu_atomic_rmw(T* p, T (*f)(T, T), T v) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomic on an unsupported size");
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_RELAXED), nw;
  do {
    T o = emu_from_bits<T>(old), n = f(o, v);
    nw = 0;
    std::memcpy(&nw, &n, sizeof(T));
  } while (!__atomic_compare_exchange_n(q, &old, nw, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));
  return emu_from_bits<T>(old);
}
#define EMU_ATOMIC(name, T, expr) \
  inline T name(T* p, T v) { return emu_atomic_rmw<T>(p, [](T a, T b) -> T { return expr; }, v); }
#define EMU_ATOMIC_INTS(name, expr) \
  EMU_ATOMIC(name, int, expr) EMU_ATOMIC(name, unsigned, expr) EMU_ATOMIC(name, unsigned long long, expr)
EMU_ATOMIC_INTS(atomicAdd, a + b)
EMU_ATOMIC(atomicAdd, float, a + b)
EMU_ATOMIC(atomicAdd, double, a + b)
EMU_ATOMIC_INTS(atomicSub, a - b)
EMU_ATOMIC_INTS(atomicExch, ((void)a, b))
EMU_ATOMIC(atomicExch, float, ((void)a, b))
EMU_ATOMIC_INTS(atomicMax, a > b ? a : b)
EMU_ATOMIC_INTS(atomicMin, a < b ? a : b)
EMU_ATOMIC(atomicMax, long long, a > b ? a : b)
EMU_ATOMIC(atomicMin, long long, a < b ? a : b)
EMU_ATOMIC_INTS(atomicAnd, a & b)
EMU_ATOMIC_INTS(atomicOr, a | b)
EMU_ATOMIC_INTS(atomicXor, a ^ b)
inline unsigned atomicInc(unsigned* p, unsigned v) { return emu_atomic_rmw<unsigned>(p, [](unsigned a, unsigned b) -> unsigned { return a >= b ? 0 : a + 1; }, v); }
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}

#include "cuda_emu_sched.h"
