// SIMT executor of the Metal-on-CPU emulator. Linked into every compiled
// kernel module; Python drives it through msl_launch() (see msl.py).
//
// Each threadgroup runs on one OS thread as a set of fibers (one per Metal
// thread) switched by a tiny hand-written x86-64 context switch. Barriers and
// SIMD collectives block a fiber until every participant has arrived; the last
// arrival releases the group. Device/constant/threadgroup accesses reach us
// through calls the IR instrumenter (msl.py) inserts before every load/store.
#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <link.h>
#include <mutex>
#include <signal.h>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <vector>

namespace {

// Must match struct __msl_ctx in shim/metal_stdlib.
struct Ctx {
  uint32_t tpig[3], tptg[3], tgpig[3], tptg_size[3], tgpg[3], tpg[3];
  uint32_t tiitg, tiisg, sgiitg, sgptg;
  void *const *bufs;
  void *const *tgbufs;
};

}  // namespace

// Shared with Python (ctypes mirrors in msl.py).
struct MslBuffer {
  void *ptr;
  uint64_t size;
  const char *name;
  uint64_t read, written;
};

struct MslLaunch {
  void *entry;
  const char *kernel;
  uint32_t grid[3], tg[3];
  uint32_t nbuf, ntgbuf;
  MslBuffer *bufs;
  uint64_t *tgbuf_sizes;
  int32_t race_check, workers;
  uint64_t stack_size, tg_limit;
  const char *const *locs;  // source locations of instrumented accesses
  uint32_t nlocs, pad;
  char err[8192];
};

extern "C" {
void msl_swap_ctx(void **save_sp, void *new_sp);
void msl_fiber_trampoline();
}

// Callee-saved registers, MXCSR and the x87 control word are all a fiber
// switch needs under the SysV ABI; far cheaper than ucontext (no sigprocmask).
asm(R"(
  .text
  .globl msl_swap_ctx
  .hidden msl_swap_ctx
  .type msl_swap_ctx,@function
msl_swap_ctx:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size msl_swap_ctx, .-msl_swap_ctx
  .globl msl_fiber_trampoline
  .hidden msl_fiber_trampoline
  .type msl_fiber_trampoline,@function
msl_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size msl_fiber_trampoline, .-msl_fiber_trampoline
)");

namespace {

enum State : uint8_t { RUN, AT_TG, AT_SG, DONE };
constexpr int kSlot = 64;       // bytes one lane may contribute to a collective
constexpr uint16_t kMany = 0xFFFF;

struct Fiber {
  void *sp;
  State st;
  const char *op;
  const char *file;
  uint32_t line;
  uint32_t tid;
  Ctx ctx;
};

struct SimdGroup {
  uint32_t live, arrived, parity;
  uint32_t mask[2];
  uint64_t epoch;  // bumped by every collective: orders lanes' memory accesses
  unsigned char slots[2][32][kSlot];
};

struct Shadow {  // race detector state of one byte of threadgroup memory
  uint64_t wep, rep;  // threadgroup epoch of last write / read
  uint64_t wsg, rsg;  // simdgroup epoch of last write / read
  uint16_t wtid, rtid, rsgid, pad;
};

struct Worker;
thread_local Worker *W = nullptr;
std::atomic<bool> g_failed{false};

struct Worker {
  MslLaunch *L = nullptr;
  uint32_t n = 0, nsg = 0;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  char *stacks = nullptr;
  size_t stacks_len = 0;
  void *sched_sp = nullptr;
  Fiber *cur = nullptr;
  uint32_t tgpos[3] = {0, 0, 0};
  // threadgroup memory
  unsigned char *tgmem = nullptr;
  uint64_t tg_used = 0;
  struct Alloc { uint32_t id; uint64_t size, off; };
  std::vector<Alloc> allocs;
  std::vector<void *> tgbufs;
  void *const *bufs = nullptr;
  // barrier state
  uint32_t live = 0, tg_arrived = 0;
  uint64_t tg_epoch = 0;
  std::vector<Shadow> shadow;
  std::vector<uint64_t> rd, wr;
  bool faulted = false;
  std::string err;
};

// Address ranges of this module's own data (program-scope `constant` data is
// read through the constant address space but is not a bound buffer).
struct Range { uintptr_t lo, hi; };
std::vector<Range> g_module;

int phdr_cb(dl_phdr_info *info, size_t, void *self) {
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const auto &ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if ((uintptr_t)self >= lo && (uintptr_t)self < lo + ph.p_memsz) {
      for (int j = 0; j < info->dlpi_phnum; j++) {
        const auto &q = info->dlpi_phdr[j];
        if (q.p_type == PT_LOAD)
          g_module.push_back({info->dlpi_addr + q.p_vaddr, info->dlpi_addr + q.p_vaddr + q.p_memsz});
      }
      return 1;
    }
  }
  return 0;
}

std::string fmt(const char *f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string tg_name() {
  return fmt("kernel '%s', threadgroup (%u,%u,%u)", W->L->kernel, W->tgpos[0], W->tgpos[1], W->tgpos[2]);
}

std::string thread_name(const Fiber &f) {
  return fmt("thread %u (position (%u,%u,%u) in threadgroup, simdgroup %u lane %u)", f.tid, f.ctx.tptg[0],
             f.ctx.tptg[1], f.ctx.tptg[2], f.ctx.sgiitg, f.ctx.tiisg);
}

// Compact "0-31, 40, 42-43" list of thread ids.
std::string id_list(const std::vector<uint32_t> &ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) j++;
    if (!s.empty()) s += ", ";
    s += j == i ? fmt("%u", ids[i]) : fmt("%u-%u", ids[i], ids[j]);
    i = j + 1;
  }
  return s;
}

// Records the fault and abandons the current fiber for good.
[[noreturn]] void fault_now(const std::string &msg) {
  if (!W->faulted) {
    W->faulted = true;
    W->err = msg;
  }
  Fiber *f = W->cur;
  void *dummy;
  msl_swap_ctx(f ? &f->sp : &dummy, W->sched_sp);
  __builtin_unreachable();
}

void block() { msl_swap_ctx(&W->cur->sp, W->sched_sp); }

std::string loc_str(uint32_t loc) {
  if (loc && loc < W->L->nlocs && W->L->locs[loc]) return std::string(" at ") + W->L->locs[loc];
  return "";
}

void sg_release(SimdGroup &g, uint32_t sgi) {
  // Every waiting lane must be at the same collective: anything else is
  // divergent control flow around a SIMD operation.
  Fiber *first = nullptr;
  bool mismatch = false;
  uint32_t mask = 0;
  for (uint32_t l = 0; l < 32; l++) {
    uint32_t t = sgi * 32 + l;
    if (t >= W->n) break;
    Fiber &f = W->fibers[t];
    if (f.st != AT_SG) continue;
    mask |= 1u << l;
    if (!first) first = &f;
    else if (strcmp(f.op, first->op) || f.line != first->line || strcmp(f.file, first->file)) mismatch = true;
  }
  if (mismatch) {
    std::string s = tg_name() + fmt(": divergent SIMD collective in simdgroup %u:", sgi);
    for (uint32_t l = 0; l < 32 && sgi * 32 + l < W->n; l++) {
      Fiber &f = W->fibers[sgi * 32 + l];
      if (f.st == AT_SG) s += fmt(" lane %u at %s (%s:%u);", l, f.op, f.file, f.line);
    }
    fault_now(s);
  }
  for (uint32_t l = 0; l < 32 && sgi * 32 + l < W->n; l++)
    if (W->fibers[sgi * 32 + l].st == AT_SG) W->fibers[sgi * 32 + l].st = RUN;
  g.mask[g.parity] = mask;
  g.parity ^= 1;
  g.arrived = 0;
  g.epoch++;
}

void tg_release() {
  std::vector<uint32_t> gone;
  for (auto &f : W->fibers)
    if (f.st == DONE) gone.push_back(f.tid);
  Fiber *first = nullptr;
  for (auto &f : W->fibers) {
    if (f.st != AT_TG) continue;
    if (!first) first = &f;
    else if (f.line != first->line || strcmp(f.file, first->file) || strcmp(f.op, first->op)) {
      fault_now(tg_name() + fmt(": divergent barriers: %s at %s (%s:%u) but %s at %s (%s:%u)",
                                thread_name(*first).c_str(), first->op, first->file, first->line,
                                thread_name(f).c_str(), f.op, f.file, f.line));
    }
  }
  if (!gone.empty()) {
    std::vector<uint32_t> waiting;
    for (auto &f : W->fibers)
      if (f.st == AT_TG) waiting.push_back(f.tid);
    fault_now(tg_name() + fmt(": divergent threadgroup_barrier (%s:%u): threads %s reached it but threads %s "
                              "had already returned (an early return before a barrier is divergence)",
                              first->file, first->line, id_list(waiting).c_str(), id_list(gone).c_str()));
  }
  for (auto &f : W->fibers)
    if (f.st == AT_TG) f.st = RUN;
  W->tg_arrived = 0;
  W->tg_epoch++;
}

void fiber_main(Fiber *f) {
  reinterpret_cast<void (*)(const Ctx *)>(W->L->entry)(&f->ctx);
  f->st = DONE;
  W->live--;
  SimdGroup &g = W->sgs[f->ctx.sgiitg];
  g.live--;
  if (g.arrived && g.arrived == g.live) sg_release(g, f->ctx.sgiitg);
  if (W->tg_arrived && W->tg_arrived == W->live) tg_release();
  block();
  __builtin_unreachable();
}

void deadlock() {
  // Group the blocked threads by where they wait.
  std::vector<std::pair<std::string, std::vector<uint32_t>>> groups;
  for (auto &f : W->fibers) {
    std::string where = f.st == DONE ? std::string("returned")
                                     : fmt("wait at %s (%s:%u)", f.op, f.file, f.line);
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto &g) { return g.first == where; });
    if (it == groups.end()) groups.push_back({where, {f.tid}});
    else it->second.push_back(f.tid);
  }
  std::string s = tg_name() + ": deadlock, no thread can make progress:";
  for (auto &g : groups) s += " threads " + id_list(g.second) + " " + g.first + ";";
  W->faulted = true;
  W->err = s;
}

void run_threadgroup(uint32_t gx, uint32_t gy, uint32_t gz) {
  MslLaunch *L = W->L;
  W->tgpos[0] = gx, W->tgpos[1] = gy, W->tgpos[2] = gz;
  // Poison threadgroup memory so reads of unwritten data stand out.
  memset(W->tgmem, 0xFF, L->tg_limit);
  W->allocs.clear();
  W->tg_used = 0;
  W->tgbufs.assign(L->ntgbuf, nullptr);
  for (uint32_t i = 0; i < L->ntgbuf; i++) {
    if (!L->tgbuf_sizes[i]) continue;
    W->tg_used = (W->tg_used + 15) & ~uint64_t(15);
    W->tgbufs[i] = W->tgmem + W->tg_used;
    W->tg_used += L->tgbuf_sizes[i];
  }
  W->live = W->n;
  W->tg_arrived = 0;
  W->tg_epoch++;
  for (uint32_t s = 0; s < W->nsg; s++) {
    SimdGroup &g = W->sgs[s];
    g.live = std::min<uint32_t>(32, W->n - s * 32);
    g.arrived = 0;
    g.parity = 0;
    g.epoch++;
  }
  const uint32_t tx = L->tg[0], ty = L->tg[1];
  for (uint32_t t = 0; t < W->n; t++) {
    Fiber &f = W->fibers[t];
    f.st = RUN;
    f.tid = t;
    f.op = "";
    f.file = "";
    f.line = 0;
    Ctx &c = f.ctx;
    c.tptg[0] = t % tx, c.tptg[1] = (t / tx) % ty, c.tptg[2] = t / (tx * ty);
    for (int d = 0; d < 3; d++) {
      c.tgpig[d] = W->tgpos[d];
      c.tptg_size[d] = L->tg[d];
      c.tgpg[d] = L->grid[d];
      c.tpg[d] = L->grid[d] * L->tg[d];
      c.tpig[d] = W->tgpos[d] * L->tg[d] + c.tptg[d];
    }
    c.tiitg = t, c.tiisg = t % 32, c.sgiitg = t / 32, c.sgptg = W->nsg;
    c.bufs = W->bufs;
    c.tgbufs = W->tgbufs.data();
    // Initial frame popped by msl_swap_ctx: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp ret.
    char *top = W->stacks + (size_t)(t + 1) * L->stack_size;
    uint64_t *sp = reinterpret_cast<uint64_t *>(top) - 8;
    uint32_t csr = 0x1F80;
    uint16_t cw = 0x037F;
    memcpy(sp, &csr, 4);
    memcpy(reinterpret_cast<char *>(sp) + 4, &cw, 2);
    sp[1] = sp[2] = 0;
    sp[3] = reinterpret_cast<uint64_t>(&fiber_main);
    sp[4] = reinterpret_cast<uint64_t>(&f);
    sp[5] = sp[6] = 0;
    sp[7] = reinterpret_cast<uint64_t>(&msl_fiber_trampoline);
    f.sp = sp;
  }
  while (W->live) {
    bool ran = false;
    for (auto &f : W->fibers) {
      if (f.st != RUN) continue;
      W->cur = &f;
      msl_swap_ctx(&W->sched_sp, f.sp);
      W->cur = nullptr;
      ran = true;
      if (W->faulted) return;
    }
    if (W->live && !ran) {
      deadlock();
      return;
    }
  }
}

// A wild pointer or a stack overflow inside a fiber becomes a reported fault
// instead of killing the process: the handler (on an alternate stack) records
// it and switches to the scheduler, abandoning the fiber.
struct sigaction g_old_segv, g_old_bus;

void on_segv(int sig, siginfo_t *si, void *uc) {
  if (W && W->cur && !W->faulted) {
    Fiber *f = W->cur;
    uintptr_t a = (uintptr_t)si->si_addr;
    uintptr_t lo = (uintptr_t)W->stacks + (size_t)f->tid * W->L->stack_size;
    bool overflow = a >= lo && a < lo + 4096;
    W->faulted = true;
    W->err = tg_name() + ", " + thread_name(*f) +
             (overflow ? fmt(": stack overflow (thread stack is %llu bytes; recursion or huge local arrays?)",
                             (unsigned long long)W->L->stack_size)
                       : fmt(": segmentation fault at address %p (wild pointer in thread address space?)", si->si_addr));
    void *dummy;
    msl_swap_ctx(&dummy, W->sched_sp);
  }
  struct sigaction &old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if (old.sa_flags & SA_SIGINFO) old.sa_sigaction(sig, si, uc);
  else if (old.sa_handler != SIG_IGN && old.sa_handler != SIG_DFL) old.sa_handler(sig);
  else {
    sigaction(sig, &old, nullptr);  // re-raised on return with the default action
  }
}

void worker_main(MslLaunch *L, std::atomic<uint64_t> *next, void *const *bufs, Worker *w) {
  W = w;
  w->L = L;
  std::vector<char> altstack(1 << 16);
  stack_t ss{}, old_ss{};
  ss.ss_sp = altstack.data();
  ss.ss_size = altstack.size();
  sigaltstack(&ss, &old_ss);
  w->bufs = bufs;
  w->n = L->tg[0] * L->tg[1] * L->tg[2];
  w->nsg = (w->n + 31) / 32;
  w->fibers.resize(w->n);
  w->sgs.resize(w->nsg);
  for (auto &g : w->sgs) g.epoch = 0;
  w->rd.assign(L->nbuf, 0);
  w->wr.assign(L->nbuf, 0);
  w->stacks_len = (size_t)w->n * L->stack_size;
  w->stacks = (char *)mmap(nullptr, w->stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (w->stacks == MAP_FAILED) {
    w->faulted = true;
    w->err = "cannot allocate fiber stacks";
    g_failed = true;
    return;
  }
  for (uint32_t t = 0; t < w->n; t++) mprotect(w->stacks + (size_t)t * L->stack_size, 4096, PROT_NONE);
  std::vector<unsigned char> tgmem(L->tg_limit + 64);
  w->tgmem = tgmem.data();
  if (L->race_check) w->shadow.assign(L->tg_limit, Shadow{});
  const uint64_t total = (uint64_t)L->grid[0] * L->grid[1] * L->grid[2];
  while (!g_failed.load(std::memory_order_relaxed)) {
    uint64_t i = next->fetch_add(1);
    if (i >= total) break;
    uint32_t gx = i % L->grid[0], gy = (i / L->grid[0]) % L->grid[1], gz = i / ((uint64_t)L->grid[0] * L->grid[1]);
    run_threadgroup(gx, gy, gz);
    if (w->faulted) {
      g_failed = true;
      break;
    }
  }
  munmap(w->stacks, w->stacks_len);
  sigaltstack(&old_ss, nullptr);
  W = nullptr;
}

void check_device(const void *p, uint64_t n, int rw, uint32_t loc, bool constant_space) {
  if (!n) return;
  MslLaunch *L = W->L;
  uintptr_t a = (uintptr_t)p;
  for (uint32_t i = 0; i < L->nbuf; i++) {
    MslBuffer &b = L->bufs[i];
    uintptr_t lo = (uintptr_t)b.ptr;
    if (!b.ptr || a < lo || a + n > lo + b.size) continue;
    if (rw & 1) W->rd[i] += n;
    if (rw & 2) W->wr[i] += n;
    return;
  }
  if (constant_space)
    for (auto &r : g_module)
      if (a >= r.lo && a + n <= r.hi) return;
  // Name the nearest buffer to make the message useful.
  int best = -1;
  uint64_t bestd = UINT64_MAX;
  for (uint32_t i = 0; i < L->nbuf; i++) {
    MslBuffer &b = L->bufs[i];
    if (!b.ptr) continue;
    uintptr_t lo = (uintptr_t)b.ptr, hi = lo + b.size;
    uint64_t d = a < lo ? lo - a : (a >= hi ? a - hi : 0);
    if (d < bestd) bestd = d, best = (int)i;
  }
  const char *what = (rw & 3) == 1 ? "read" : (rw & 3) == 2 ? "write" : "read-modify-write";
  std::string s = tg_name() + ", " + thread_name(*W->cur) + fmt(": out-of-bounds %s %s of %llu bytes", constant_space ? "constant" : "device", what, (unsigned long long)n);
  if (best >= 0) {
    MslBuffer &b = L->bufs[best];
    long long off = (long long)(a - (uintptr_t)b.ptr);
    s += fmt(" at byte offset %lld of buffer %d '%s' (%llu bytes)", off, best, b.name ? b.name : "?", (unsigned long long)b.size);
  } else {
    s += fmt(" at address %p (no buffer bound)", p);
  }
  s += loc_str(loc);
  fault_now(s);
}

}  // namespace

extern "C" {

// ---- called by instrumented kernel code ----
void __msl_rt_access1(const void *p, uint64_t n, int32_t rw, uint32_t loc) { check_device(p, n, rw, loc, false); }
void __msl_rt_access2(const void *p, uint64_t n, int32_t rw, uint32_t loc) { check_device(p, n, rw, loc, true); }

// Threadgroup access (race-check builds only): bounds + happens-before check.
void __msl_rt_access3(const void *p, uint64_t n, int32_t rw, uint32_t loc) {
  Fiber *me = W->cur;
  uintptr_t off = (uintptr_t)p - (uintptr_t)W->tgmem;
  if ((uintptr_t)p < (uintptr_t)W->tgmem || off + n > W->tg_used)
    fault_now(tg_name() + ", " + thread_name(*me) + fmt(": threadgroup memory access of %llu bytes at offset %lld outside the %llu bytes allocated", (unsigned long long)n, (long long)off, (unsigned long long)W->tg_used) + loc_str(loc));
  if (rw & 4) return;  // atomics do not race with each other
  const uint16_t tid = (uint16_t)me->tid;
  const uint16_t sg = (uint16_t)me->ctx.sgiitg;
  const uint64_t ep = W->tg_epoch, sgep = W->sgs[sg].epoch;
  // Two accesses are ordered if by the same thread, separated by a threadgroup
  // barrier, or by lanes of one simdgroup separated by a SIMD collective.
  auto conflict = [&](uint16_t t, uint64_t e, uint64_t se) {
    if (e != ep || t == tid) return false;
    return W->fibers[t].ctx.sgiitg != sg || se == sgep;
  };
  for (uint64_t i = 0; i < n; i++) {
    Shadow &s = W->shadow[off + i];
    const char *kind = nullptr;
    uint16_t other = 0;
    if (conflict(s.wtid, s.wep, s.wsg)) kind = rw == 1 ? "reads" : "overwrites", other = s.wtid;
    if (!kind && (rw & 2) && s.rep == ep) {
      if (s.rtid == kMany) {
        if (!(s.rsgid == sg && s.rsg != sgep)) kind = "writes (after reads by several threads)", other = kMany;
      } else if (conflict(s.rtid, s.rep, s.rsg)) {
        kind = "writes", other = s.rtid;
      }
    }
    if (kind) {
      std::string o = other == kMany ? std::string("other threads") : thread_name(W->fibers[other]);
      fault_now(tg_name() + ": threadgroup memory race at byte offset " + fmt("%llu", (unsigned long long)(off + i)) + ": " + thread_name(*me) + " " + kind + " it, last " + (other != kMany && kind[0] != 'w' ? "written" : "accessed") + " by " + o + " in the same barrier interval (missing threadgroup_barrier?)" + loc_str(loc));
    }
    if (rw & 2) {
      s.wtid = tid, s.wep = ep, s.wsg = sgep;
      s.rep = 0;
    }
    if (rw & 1) {
      if (s.rep == ep && s.rtid != tid) {
        if (s.rtid != kMany && W->fibers[s.rtid].ctx.sgiitg != sg) s.rsgid = kMany;
        s.rtid = kMany;
      } else if (s.rep != ep) {
        s.rtid = tid, s.rsgid = sg;
      }
      s.rep = ep, s.rsg = sgep;
    }
  }
}

void __msl_rt_tg_barrier(const char *op, const char *file, uint32_t line) {
  Fiber *f = W->cur;
  f->st = AT_TG, f->op = op, f->file = file, f->line = line;
  if (++W->tg_arrived == W->live) tg_release();
  else block();
}

// Collective exchange within a simdgroup: every live lane contributes nbytes,
// and after all have arrived each gets the live lanes' contributions in `all`
// (32 slots of nbytes) plus the mask of live lanes. Returns the lane index.
uint32_t __msl_rt_simd_sync(const char *op, const void *mine, uint32_t nbytes, void *all, uint32_t *mask,
                            const char *file, uint32_t line) {
  Fiber *f = W->cur;
  if (nbytes > kSlot) fault_now(fmt("%s: value of %u bytes too large for the emulator", op, nbytes));
  uint32_t sgi = f->ctx.sgiitg, lane = f->ctx.tiisg;
  SimdGroup &g = W->sgs[sgi];
  uint32_t p = g.parity;
  if (nbytes) memcpy(g.slots[p][lane], mine, nbytes);
  f->st = AT_SG, f->op = op, f->file = file, f->line = line;
  if (++g.arrived == g.live) sg_release(g, sgi);
  else block();
  uint32_t m = g.mask[p];
  if (mask) *mask = m;
  if (all && nbytes)
    for (uint32_t l = 0; l < 32; l++)
      if (m >> l & 1) memcpy((char *)all + l * nbytes, g.slots[p][l], nbytes);
  return lane;
}

uint32_t __msl_rt_lane() { return W->cur->ctx.tiisg; }
uint32_t __msl_rt_simd_size() { return std::min<uint32_t>(32, W->n - W->cur->ctx.sgiitg * 32); }

void *__msl_rt_tg_alloc(uint32_t id, uint64_t size, uint64_t align) {
  for (auto &a : W->allocs)
    if (a.id == id && a.size == size) return W->tgmem + a.off;
  uint64_t off = (W->tg_used + align - 1) & ~(align - 1);
  if (off + size > W->L->tg_limit) {
    fault_now(tg_name() + fmt(": threadgroup memory of %llu bytes exceeds the %llu-byte limit (this declaration "
                              "needs %llu bytes at offset %llu)",
                              (unsigned long long)(off + size), (unsigned long long)W->L->tg_limit,
                              (unsigned long long)size, (unsigned long long)off));
  }
  W->allocs.push_back({id, size, off});
  W->tg_used = off + size;
  return W->tgmem + off;
}

void __msl_rt_fault(const char *msg) { fault_now(tg_name() + ", " + thread_name(*W->cur) + ": " + msg); }

// libgcc 12 has no float -> bfloat conversion; round to nearest even.
__bf16 __truncsfbf2(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  uint16_t h;
  if ((u & 0x7FFFFFFF) > 0x7F800000) h = (uint16_t)((u >> 16) | 0x40);
  else h = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  return __builtin_bit_cast(__bf16, h);
}

// ---- called from Python ----
int msl_launch(MslLaunch *L) {
  static std::once_flag once;
  std::call_once(once, [] { dl_iterate_phdr(phdr_cb, (void *)&phdr_cb); });
  g_failed = false;
  L->err[0] = 0;
  uint64_t total = (uint64_t)L->grid[0] * L->grid[1] * L->grid[2];
  int nw = (int)std::max<uint64_t>(1, std::min<uint64_t>(L->workers > 0 ? L->workers : 1, total));
  std::vector<void *> bufs(L->nbuf + 1, nullptr);
  for (uint32_t i = 0; i < L->nbuf; i++) bufs[i] = L->bufs[i].ptr;
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  std::atomic<uint64_t> next{0};
  std::vector<Worker> ws(nw);
  std::vector<std::thread> th;
  for (int i = 1; i < nw; i++) th.emplace_back(worker_main, L, &next, bufs.data(), &ws[i]);
  worker_main(L, &next, bufs.data(), &ws[0]);
  for (auto &t : th) t.join();
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  for (auto &w : ws) {
    if (w.faulted && !L->err[0]) snprintf(L->err, sizeof L->err, "%s", w.err.c_str());
    for (uint32_t i = 0; i < L->nbuf && i < w.rd.size(); i++) {
      L->bufs[i].read += w.rd[i];
      L->bufs[i].written += w.wr[i];
    }
  }
  return L->err[0] ? 1 : 0;
}
}
