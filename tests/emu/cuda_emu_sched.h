// cuda_emu_sched.h -- the block scheduler, grid runner and launcher template of cuda_emu.h.
#pragma once

// Defined by the harness's generated shared-memory unit: the calling thread's `extern __shared__` buffers.
extern "C" __attribute__((weak)) int emu_dyn_buffers(unsigned char** out, int max);

namespace emu {
// The calling thread's static TLS block of this module (all of it is __shared__ storage, plus tls_w).
struct TlsBlock { unsigned char* data = nullptr; size_t size = 0; };
inline int find_tls_cb(dl_phdr_info* info, size_t, void* p) {
  auto addr = reinterpret_cast<ElfW(Addr)>(&emu_switch);
  bool ours = false;
  size_t tls = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD && addr >= info->dlpi_addr + ph.p_vaddr &&
        addr < info->dlpi_addr + ph.p_vaddr + ph.p_memsz) ours = true;
    if (ph.p_type == PT_TLS) tls = ph.p_memsz;
  }
  if (!ours) return 0;
  auto* out = static_cast<TlsBlock*>(p);
  out->data = static_cast<unsigned char*>(info->dlpi_tls_data);
  out->size = out->data ? tls : 0;
  return 1;
}

struct Shared {  // what poison_shared() fills at each block start
  TlsBlock tls;
  unsigned char* dyn[16];
  int ndyn = 0;
};

inline void init_shared(Shared& s) {
  s.ndyn = emu_dyn_buffers ? emu_dyn_buffers(s.dyn, 16) : 0;
  dl_iterate_phdr(find_tls_cb, &s.tls);
}

inline void fill_range(unsigned char* a, unsigned char* b, const Shared& s) {  // skip dynamic buffers
  for (int i = 0; i < s.ndyn; ++i) {
    unsigned char *d0 = s.dyn[i], *d1 = d0 + kMaxDynSmem;
    if (d1 <= a || d0 >= b) continue;
    if (d0 > a) fill_range(a, d0, s);
    if (d1 < b) fill_range(d1, b, s);
    return;
  }
  if (b > a) std::memset(a, 0xFF, b - a);
}

inline void poison_shared(const Shared& s, size_t shmem) {
  Worker* w = tls_w;
  if (s.tls.data) fill_range(s.tls.data, s.tls.data + s.tls.size, s);
  tls_w = w;  // tls_w lives in the same TLS block
  for (int i = 0; i < s.ndyn; ++i) {
#if EMU_ASAN
    __asan_unpoison_memory_region(s.dyn[i], kMaxDynSmem);
#endif
    std::memset(s.dyn[i], 0xFF, shmem);
#if EMU_ASAN
    __asan_poison_memory_region(s.dyn[i] + shmem, kMaxDynSmem - shmem);
#endif
  }
}

inline void unpoison_shared(const Shared& s) {
#if EMU_ASAN
  for (int i = 0; i < s.ndyn; ++i) __asan_unpoison_memory_region(s.dyn[i], kMaxDynSmem);
#else
  (void)s;
#endif
}

inline void compute_group(Worker* w, int base, unsigned m, int op) {
  Fiber* F = &w->fibers[base];
  uint64_t poison = ~0ull;
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (m >> l & 1u && F[l].val) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!(m >> l & 1u)) continue;
    Fiber& f = F[l];
    uint64_t r = 0;
    if (op <= SHFL_XOR) {
      int seg = 32 - f.width, b = f.arg, minl = l & seg, j;
      bool ok;
      if (op == SHFL_IDX) { j = minl | (b & 31 & ~seg); ok = true; }
      else if (op == SHFL_UP) { j = l - b; ok = j >= minl; }
      else if (op == SHFL_DOWN) { j = l + b; ok = j <= (minl | (31 & ~seg)); }
      else { j = l ^ b; ok = j <= (minl | (31 & ~seg)); }
      // A source lane that does not take part gives an undefined value: all-ones bytes (NaN).
      r = !ok ? f.val : (j >= 0 && j < 32 && (m >> j & 1u)) ? F[j].val : poison;
    } else if (op == BALLOT) r = ballot;
    else if (op == ANY) r = ballot != 0;
    else if (op == ALL) r = ballot == m;
    else if (op == MATCH_ANY) {
      for (int k = 0; k < 32; ++k)
        if (m >> k & 1u && F[k].val == f.val) r |= 1ull << k;
    } else if (op >= RED_ADD && op <= RED_UMAX) {
      bool first = true;
      for (int k = 0; k < 32; ++k) {
        if (!(m >> k & 1u)) continue;
        uint32_t v = (uint32_t)F[k].val, a = (uint32_t)r;
        if (first) { a = v; first = false; }
        else if (op == RED_ADD) a += v;
        else if (op == RED_MIN) a = (int32_t)v < (int32_t)a ? v : a;
        else if (op == RED_MAX) a = (int32_t)v > (int32_t)a ? v : a;
        else if (op == RED_UMIN) a = v < a ? v : a;
        else a = v > a ? v : a;
        r = a;
      }
    }
    f.res = r;
  }
  for (int l = 0; l < 32; ++l)
    if (m >> l & 1u) F[l].state = RUN;
}

// Why can't the group of lane `l` (waiting at a collective) proceed? Empty when it can.
inline std::string group_blocker(Worker* w, int base, int l) {
  const Fiber& f = w->fibers[base + l];
  char buf[400];
  for (int k = 0; k < 32; ++k) {
    if (!(f.mask >> k & 1u)) continue;
    int t = base + k;
    const char* what = kOpName[f.op];
    if (t >= w->nthreads) {
      snprintf(buf, sizeof buf, "thread %d: %s (line %d) mask 0x%08x names lane %d, which does not exist "
               "(block has %d threads)", base + l, what, f.line, f.mask, k, w->nthreads);
      return buf;
    }
    const Fiber& g = w->fibers[t];
    if (g.state == WARP && g.op == f.op && g.mask == f.mask) continue;
    if (g.state == DONE)
      snprintf(buf, sizeof buf, "thread %d waits at %s (line %d, mask 0x%08x) for lane %d, which has exited",
               base + l, what, f.line, f.mask, k);
    else if (g.state == BAR)
      snprintf(buf, sizeof buf, "thread %d waits at %s (line %d, mask 0x%08x) for lane %d, which waits at "
               "__syncthreads (line %d)", base + l, what, f.line, f.mask, k, g.line);
    else if (g.state == WARP)
      snprintf(buf, sizeof buf, "thread %d waits at %s (line %d, mask 0x%08x) but lane %d is at %s (line %d, "
               "mask 0x%08x)", base + l, what, f.line, f.mask, k, kOpName[g.op], g.line, g.mask);
    else
      return "";
    return buf;
  }
  return "";
}

inline bool resolve_warp(Worker* w, int warp) {
  int base = warp * 32, n = std::min(32, w->nthreads - base);
  bool any = false;
  for (int l = 0; l < n; ++l) {
    Fiber& f = w->fibers[base + l];
    if (f.state != WARP || !group_blocker(w, base, l).empty()) continue;
    compute_group(w, base, f.mask, f.op);
    any = true;
  }
  return any;
}

inline void init_fibers(Worker* w) {
  auto entry = &fiber_entry;
  for (int i = 0; i < w->nthreads; ++i) {
    Fiber& f = w->fibers[i];
    auto top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                              // fake return address of fiber_entry
    *--sp = reinterpret_cast<void*>(entry);       // emu_switch returns here
    for (int r = 0; r < 6; ++r) *--sp = nullptr;  // rbp rbx r12-r15
    f.sp = sp;
    f.state = RUN;
    f.line = 0;
  }
}

inline void run_block(Worker* w) {
  init_fibers(w);
  int n = w->nthreads, nwarps = (n + 31) / 32;
  while (!w->abort) {
    bool progress = false;
    if (g_schedule == 1) {  // warp-serial: each warp runs as far as it can before the next
      for (int wp = 0; wp < nwarps && !w->abort; ++wp) {
        for (bool again = true; again && !w->abort;) {
          again = false;
          for (int i = wp * 32; i < std::min(n, wp * 32 + 32) && !w->abort; ++i)
            if (w->fibers[i].state == RUN) { resume(w, &w->fibers[i]); again = progress = true; }
          if (!w->abort && resolve_warp(w, wp)) again = progress = true;
        }
      }
    } else {
      for (int k = 0; k < n && !w->abort; ++k) {
        int i = g_schedule == 2 ? n - 1 - k : k;
        if (w->fibers[i].state == RUN) { resume(w, &w->fibers[i]); progress = true; }
      }
      for (int wp = 0; wp < nwarps && !w->abort; ++wp) progress |= resolve_warp(w, wp);
    }
    if (w->abort || progress) continue;
    int done = 0, bar = 0, first_done = -1, first_bar = -1, first_warp = -1;
    for (int i = 0; i < n; ++i) {
      int s = w->fibers[i].state;
      if (s == DONE) { ++done; if (first_done < 0) first_done = i; }
      if (s == BAR) { ++bar; if (first_bar < 0) first_bar = i; }
      if (s == WARP && first_warp < 0) first_warp = i;
    }
    if (done == n) return;
    if (first_warp >= 0) {
      std::string why = group_blocker(w, first_warp / 32 * 32, first_warp % 32);
      fail("deadlock in a warp collective: %s", why.c_str());
      return;
    }
    const Fiber& fb = w->fibers[first_bar];
    if (done) {
      fail("%d of %d threads wait at __syncthreads (line %d) but thread %d has exited: every live thread "
           "must reach the same barriers", bar, n, fb.line, first_done);
      return;
    }
    int count = 0;
    for (int i = 0; i < n; ++i) {
      const Fiber& f = w->fibers[i];
      if (f.line != fb.line) {
        fail("divergent __syncthreads: thread %d waits at line %d, thread %d at line %d", first_bar, fb.line,
             i, f.line);
        return;
      }
      count += f.bar_pred;
    }
    w->bar_count = count;
    for (int i = 0; i < n; ++i) w->fibers[i].state = RUN;
  }
}

// CuPy compiles every RawModule with -ftz=true: single-precision denormal inputs and results are
// flushed to zero. MXCSR's FTZ and DAZ bits do the same for the host's SSE float math, for the
// launch only (the caller's own thread gets its MXCSR back).
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

inline void worker_main(Launch* L) {
  FlushDenormals ftz;
  Worker w;
  w.L = L;
  tls_w = &w;
  w.bdim = L->block;
  w.gdim = L->grid;
  w.nthreads = (int)(L->block.x * L->block.y * L->block.z);
  w.fibers.resize(w.nthreads);
  w.stacks_bytes = (size_t)w.nthreads * (kStack + kGuard);
  void* mem = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) { fail("cannot map fiber stacks"); tls_w = nullptr; return; }
  w.stacks = static_cast<char*>(mem);
#if EMU_ASAN  // blocks that finish leave no frames behind; a failed block ends the launch
  __asan_unpoison_memory_region(mem, w.stacks_bytes);
#endif
  for (int i = 0; i < w.nthreads; ++i) {
    char* g = w.stacks + (size_t)i * (kStack + kGuard);
    mprotect(g, kGuard, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    Fiber& f = w.fibers[i];
    f.stack = g + kGuard;
    f.lin = i;
    f.tid = make_uint3(i % L->block.x, i / L->block.x % L->block.y, i / (L->block.x * L->block.y));
  }
  Shared sh;
  init_shared(sh);
  long total = (long)L->grid.x * L->grid.y * L->grid.z;
  for (;;) {
    long b = L->next.fetch_add(1);
    if (b >= total || L->failed.load()) break;
    w.bidx = make_uint3(b % L->grid.x, b / L->grid.x % L->grid.y, b / ((long)L->grid.x * L->grid.y));
    w.abort = false;
    poison_shared(sh, L->shmem);
    run_block(&w);
  }
  unpoison_shared(sh);
  tls_w = nullptr;
}

inline std::mutex g_launch_mu;

inline int run_grid(dim3 g, dim3 b, size_t shmem, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(g_launch_mu);
  char buf[256];
  unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
  if (nt < 1 || nt > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    snprintf(buf, sizeof buf, "invalid block (%u,%u,%u): at most 1024 threads, z <= 64", b.x, b.y, b.z);
    g_last_error = buf;
    return 1;
  }
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    snprintf(buf, sizeof buf, "invalid grid (%u,%u,%u)", g.x, g.y, g.z);
    g_last_error = buf;
    return 1;
  }
  if (shmem > kMaxDynSmem) {
    snprintf(buf, sizeof buf, "dynamic shared memory %zu bytes exceeds the 227 KiB limit (%zu)", shmem, kMaxDynSmem);
    g_last_error = buf;
    return 1;
  }
  Launch L;
  L.grid = g; L.block = b; L.shmem = shmem; L.body = body; L.ctx = ctx;
  long total = (long)g.x * g.y * g.z;
  int nw = g_workers > 0 ? g_workers : (int)std::max(1u, std::thread::hardware_concurrency());
  nw = (int)std::min<long>(nw, total);
  std::vector<std::thread> pool;
  for (int i = 1; i < nw; ++i) pool.emplace_back(worker_main, &L);
  worker_main(&L);
  for (auto& t : pool) t.join();
  g_last_error = L.error;
  return L.failed ? 1 : 0;
}

// ---- the launcher: unpacks cuLaunchKernel-style void** args by the kernel's own parameter types -----
template <class T> std::string type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer<U>::value) {
    using E = std::remove_cv_t<std::remove_pointer_t<U>>;
    if constexpr (std::is_same<E, __half2>::value || std::is_same<E, __nv_bfloat162>::value ||
                  std::is_same<E, float2>::value || std::is_same<E, float4>::value) {
      std::string c = type_code<E>();
      return "ptr:" + c.substr(0, c.size() - 2);
    } else {
      std::string c = type_code<E>();
      return "ptr:" + (c[0] == 'b' && c != "bool" && c != "bf16" ? std::string("any") : c);
    }
  } else if constexpr (std::is_same<U, bool>::value) return "bool";
  else if constexpr (std::is_integral<U>::value)
    return (std::is_signed<U>::value ? "i" : "u") + std::to_string(sizeof(U) * 8);
  else if constexpr (std::is_same<U, float>::value) return "f32";
  else if constexpr (std::is_same<U, double>::value) return "f64";
  else if constexpr (std::is_same<U, __half>::value) return "f16";
  else if constexpr (std::is_same<U, __nv_bfloat16>::value) return "bf16";
  else if constexpr (std::is_same<U, __half2>::value) return "f16x2";
  else if constexpr (std::is_same<U, __nv_bfloat162>::value) return "bf16x2";
  else if constexpr (std::is_same<U, float2>::value) return "f32x2";
  else if constexpr (std::is_same<U, float4>::value) return "f32x4";
  else if constexpr (std::is_void<U>::value) return "any";
  else return "b" + std::to_string(sizeof(U));
}

template <class... A> const char* signature(void (*)(A...)) {
  static const std::string s = [] {
    std::string r;
    ((r += (r.empty() ? "" : ",") + type_code<std::decay_t<A>>()), ...);
    return r;
  }();
  return s.c_str();
}

template <class... A, size_t... I>
int launch_impl(void (*k)(A...), dim3 g, dim3 b, size_t sh, void** args, std::index_sequence<I...>) {
  using Tup = std::tuple<std::decay_t<A>...>;
  Tup t;
  (std::memcpy(static_cast<void*>(&std::get<I>(t)), args[I], sizeof(std::get<I>(t))), ...);
  struct Ctx { void (*k)(A...); Tup* t; } c{k, &t};
  return run_grid(g, b, sh, [](void* p) { auto* c = static_cast<Ctx*>(p); std::apply(c->k, *c->t); }, &c);
}

template <class... A> int launch(void (*k)(A...), dim3 g, dim3 b, size_t sh, void** args) {
  return launch_impl(k, g, b, sh, args, std::index_sequence_for<A...>{});
}
}  // namespace emu

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
EMU_EXPORT const char* emu_last_error() { return emu::g_last_error.c_str(); }
EMU_EXPORT void emu_set_schedule(int s) { emu::g_schedule = s; }
EMU_EXPORT void emu_set_workers(int n) { emu::g_workers = n; }
