// Plain-C++ services for the CPU kernels: instruction-set dispatch, the
// thread pool and per-thread scratch memory.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "flash_cpu.h"

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#if defined(FA_HAVE_X86_KERNELS)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace flash_cpu {

namespace {

#if defined(FA_HAVE_X86_KERNELS)
// AVX512-BF16 (CPUID leaf 7, subleaf 1, EAX bit 5): bfloat16 dot products
// and conversions.
bool avx512_bf16() {
  unsigned a, b, c, d;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a >> 5 & 1);
}

// AMX tiles with bfloat16 dot products, and AVX512-BF16 conversions. Linux
// hands out the tile state only to processes that ask for it
// (ARCH_REQ_XCOMP_PERM for XTILEDATA); the request fails where the kernel or
// the hypervisor does not support AMX.
bool amx_bf16_usable() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tiles = (d >> 22 & 1) && (d >> 24 & 1); // AMX-BF16, AMX-TILE
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return tiles && avx512_bf16() &&
         syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#endif

struct Isa {
  const char* name;
  void (*forward)(const ForwardArgs&);
  void (*backward)(const BackwardArgs&);
};

// The best supported build, or a lesser one named by MLX_FLASH_ATTN_ISA
// (how the tests check every build on one machine).
Isa detect_isa() {
  const char* want = std::getenv("MLX_FLASH_ATTN_ISA");
  auto allowed = [&](const char* name) { return !want || std::strcmp(want, name) == 0; };
#if defined(FA_HAVE_X86_KERNELS)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && allowed("avx512-amx") && amx_bf16_usable())
    return {"avx512-amx", &amx::forward, &amx::backward};
  if (avx512 && allowed("avx512-bf16") && avx512_bf16())
    return {"avx512-bf16", &avx512bf16::forward, &avx512bf16::backward};
  if (avx512 && allowed("avx512")) return {"avx512", &avx512::forward, &avx512::backward};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && allowed("avx2"))
    return {"avx2", &avx2::forward, &avx2::backward};
#endif
  return {"generic", &generic::forward, &generic::backward};
}

const Isa& isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// A fixed pool of (cores - 1) workers; the calling thread works too. One
// parallel_for at a time (MLX runs our primitive on its CPU stream thread);
// the mutex makes concurrent callers take turns rather than interleave.
// Cores: those the process may run on (Linux: its affinity mask, e.g.
// under taskset or a cpuset), else all of them.
class Pool {
 public:
  Pool() {
    unsigned n = std::max(1u, std::thread::hardware_concurrency());
#if defined(__linux__)
    if (sched_getaffinity(0, sizeof(allowed_), &allowed_) == 0)
      n = unsigned(std::max(1, CPU_COUNT(&allowed_)));
    else
      CPU_ZERO(&allowed_);
#endif
    if (const char* env = std::getenv("MLX_FLASH_ATTN_NUM_THREADS"))
      n = std::max(1, std::atoi(env));
    for (unsigned i = 1; i < n; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return int(workers_.size()) + 1; }

  void run(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
    std::lock_guard<std::mutex> caller(run_mu_);
    if (workers_.empty() || n == 1) {
      for (int64_t i = 0; i < n; ++i) fn(ctx, i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_ = n;
      next_.store(0);
      active_.store(int(workers_.size()));
      generation_.fetch_add(1, std::memory_order_release);
    }
    keep_off_caller_cpu();
    cv_.notify_all();
    work();
    if (spin_until([this] { return active_.load(std::memory_order_acquire) == 0; })) return;
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_.load() == 0; });
  }

 private:
  // Workers spin between calls where they last ran, and the caller (MLX's
  // stream thread, woken for each call) may be woken onto a spinning
  // worker's core. The load balancer leaves two busy threads there alone
  // (both cache-hot): they shared one core for dozens of calls while the
  // other idled (2 vCPUs, 256-token causal bfloat16: 0.26 -> 0.6-0.78 ms a
  // call). So the workers may run on any allowed core but the caller's
  // current one: a syscall per worker where the caller has moved, none
  // otherwise. (12 fresh processes of 400 such calls: calls over 1.6x the
  // fastest tenth 8.4% -> 0.9%, the median 0.317 -> 0.293 ms.)
  void keep_off_caller_cpu() {
#if defined(__linux__)
    const int c = sched_getcpu();
    if (c < 0 || c == avoided_ || !CPU_ISSET(c, &allowed_) || CPU_COUNT(&allowed_) < 2) return;
    cpu_set_t set = allowed_;
    CPU_CLR(c, &set);
    for (auto& t : workers_) pthread_setaffinity_np(t.native_handle(), sizeof(set), &set);
    avoided_ = c;
#endif
  }

  // A kernel call runs a few parallel_fors back to back, and a model calls
  // the kernel layer after layer: waiting threads spin for a moment before
  // sleeping, since waking a sleeping thread costs tens of microseconds.
  template <typename Ready>
  static bool spin_until(Ready ready) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    for (int i = 1;; ++i) {
      if (ready()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#elif defined(__aarch64__)
      asm volatile("yield");
#endif
      if (i % 64 == 0 && std::chrono::steady_clock::now() > end) return false;
    }
  }
  void work() {
    for (int64_t i; (i = next_.fetch_add(1)) < n_;) fn_(ctx_, i);
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; })) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || generation_.load() != seen; });
        if (stop_) return;
      }
      seen = generation_.load(std::memory_order_acquire);
      work();
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
#if defined(__linux__)
  cpu_set_t allowed_; // the cores the pool was made for (empty if unknown)
  int avoided_ = -1;  // the core the workers are kept off (run_mu_ guards it)
#endif
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter
  // exit can deadlock.
  static Pool* p = new Pool();
  return *p;
}

} // namespace

void forward(const ForwardArgs& args) {
  isa().forward(args);
}

void backward(const BackwardArgs& args) {
  isa().backward(args);
}

const char* isa_name() {
  return isa().name;
}

void parallel_for(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
  pool().run(n, fn, ctx);
}

int num_threads() {
  return pool().size();
}

void* thread_scratch(size_t nbytes, int slot) {
  struct Buf {
    void* ptr = nullptr;
    size_t size = 0;
    ~Buf() { std::free(ptr); }
  };
  thread_local Buf bufs[kScratchSlots];
  Buf& buf = bufs[slot];
  if (buf.size < nbytes) {
    std::free(buf.ptr);
    buf.size = (nbytes + 63) / 64 * 64;
    buf.ptr = std::aligned_alloc(64, buf.size);
    if (!buf.ptr) throw std::bad_alloc();
  }
  return buf.ptr;
}

} // namespace flash_cpu
