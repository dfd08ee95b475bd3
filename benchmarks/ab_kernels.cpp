// A/B timing of two builds of the CPU kernels (namespaces flash_cpu::va and
// flash_cpu::vb, see ab_kernels.sh) in one process, their calls alternated:
// a shared machine's load drifts by 10-30% over seconds, which separate runs
// cannot tell from a change of a few percent.
//
//   ab_kernels B H L D causal dtype iters [bwd [threads [Hk [Lq]]]]
//   (dtype: 0 float32, 1 float16, 2 bfloat16; threads: 1 by default; Hk: K/V heads,
//   H by default (GQA); Lq: query rows, L by default: 1 times decoding)
//
// Prints the median and best time of each build, their ratio, and the
// largest difference between the two builds' outputs (they should agree to
// rounding).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "flash_cpu.h"

#if defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace flash_cpu {
namespace va {
void forward(const ForwardArgs&);
void backward(const BackwardArgs&);
}
namespace vb {
void forward(const ForwardArgs&);
void backward(const BackwardArgs&);
}
// The kernels' services: serial, or on `threads` threads started per call
// (a plainer pool than runtime.cpp's, the same for both builds).
static int threads = 1;
void parallel_for(int64_t n, void (*fn)(void*, int64_t), void* ctx) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i; (i = next++) < n;) fn(ctx, i);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads && t < n; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}
int num_threads() { return threads; }
void* thread_scratch(size_t n, int slot) {
  struct Scratch {
    void* p = nullptr;
    size_t size = 0;
    ~Scratch() { free(p); }
  };
  thread_local Scratch slots[kScratchSlots];
  Scratch& s = slots[slot];
  if (s.size < n) {
    free(s.p);
    s.size = (n + 63) / 64 * 64;
    s.p = aligned_alloc(64, s.size);
  }
  return s.p;
}
// What revisions before 4f005d2 (one buffer per thread) call.
void* thread_scratch(size_t n) { return thread_scratch(n, 0); }
} // namespace flash_cpu

using namespace flash_cpu;

static double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static float value(const std::vector<char>& a, size_t i, int dt) {
  if (dt == 0) return reinterpret_cast<const float*>(a.data())[i];
  if (dt == 1) return float(reinterpret_cast<const _Float16*>(a.data())[i]);
  const uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(a.data())[i]) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

int main(int argc, char** argv) {
  if (argc < 8) {
    fprintf(stderr, "usage: %s B H L D causal dtype iters [bwd [threads [Hk [Lq]]]]\n", argv[0]);
    return 2;
  }
  const int B = atoi(argv[1]), H = atoi(argv[2]), L = atoi(argv[3]), D = atoi(argv[4]);
  const int causal = atoi(argv[5]), dt = atoi(argv[6]), iters = atoi(argv[7]);
  const int bwd = argc > 8 && atoi(argv[8]);
  threads = argc > 9 ? atoi(argv[9]) : 1;
#if defined(__x86_64__)
  // AMX builds (FA_FLAGS with -mamx-tile) need the tile state, which Linux
  // grants on request (ARCH_REQ_XCOMP_PERM, XTILEDATA); elsewhere it fails
  // harmlessly.
  syscall(SYS_arch_prctl, 0x1023, 18);
#endif
  const int Hk = argc > 10 ? atoi(argv[10]) : H, Lq = argc > 11 ? atoi(argv[11]) : L;
  FlashParams p{};
  p.B = B;
  p.Hq = H;
  p.Hk = Hk;
  p.Lq = Lq;
  p.Lk = L;
  p.D = p.Dv = D;
  p.gqa_ratio = H / Hk;
  const fa_index_t qs[4] = {fa_index_t(H) * Lq * D, fa_index_t(Lq) * D, D, 1};
  const fa_index_t ks[4] = {fa_index_t(Hk) * L * D, fa_index_t(L) * D, D, 1};
  for (fa_index_t* s : {p.q_strides, p.do_strides}) memcpy(s, qs, sizeof qs);
  for (fa_index_t* s : {p.k_strides, p.v_strides}) memcpy(s, ks, sizeof ks);
  const fa_index_t ls[3] = {fa_index_t(H) * Lq, Lq, 1};
  memcpy(p.dlse_strides, ls, sizeof ls);
  p.scale = 1.0f / sqrtf(float(D));
  p.window_left = -1;
  p.window_right = causal ? 0 : -1;
  p.q_offset = L - Lq;
  p.max_rows_q = Lq;
  p.max_rows_k = L;

  const size_t nq = size_t(B) * H * Lq * D, nk = size_t(B) * Hk * L * D, es = dt == 0 ? 4 : 2;
  std::vector<char> q(nq * es), k(nk * es), v(nk * es), dout(nq * es);
  std::vector<char> out[2], dq[2], dk[2], dv[2];
  for (int x = 0; x < 2; ++x) {
    for (auto* a : {&out[x], &dq[x]}) a->assign(nq * es, 0);
    for (auto* a : {&dk[x], &dv[x]}) a->assign(nk * es, 0);
  }
  std::vector<float> lse(size_t(B) * H * Lq), dlse(size_t(B) * H * Lq, 0.0f);
  srand(1);
  for (auto* a : {&q, &k, &v, &dout})
    for (size_t i = 0; i < a->size() / es; ++i) {
      const float f = rand() / float(RAND_MAX) * 2 - 1;
      uint32_t u;
      memcpy(&u, &f, 4);
      if (dt == 0) memcpy(a->data() + 4 * i, &f, 4);
      else if (dt == 1) reinterpret_cast<_Float16*>(a->data())[i] = _Float16(f);
      else reinterpret_cast<uint16_t*>(a->data())[i] = uint16_t(u >> 16);
    }
  ForwardArgs fa[2];
  BackwardArgs ba[2];
  for (int x = 0; x < 2; ++x) {
    fa[x] = {&p, DType(dt), q.data(), k.data(), v.data(), nullptr, nullptr,
             nullptr, nullptr, out[x].data(), lse.data()};
    ba[x] = {fa[x], dout.data(), dlse.data(), dq[x].data(), dk[x].data(), dv[x].data(),
             nullptr, nullptr, nullptr};
  }
  va::forward(fa[0]); // the outputs and LSE each backward reads
  vb::forward(fa[1]);
  auto run = [&](int x) {
    if (x == 0) bwd ? va::backward(ba[0]) : va::forward(fa[0]);
    else bwd ? vb::backward(ba[1]) : vb::forward(fa[1]);
  };
  std::vector<double> t[2];
  for (int i = 0; i < iters + 1; ++i)
    for (int x = 0; x < 2; ++x) {
      const double t0 = now();
      run(x);
      if (i > 0) t[x].push_back(now() - t0); // the first call of each warms up
    }
  double diff = 0.0;
  const std::vector<std::vector<char>*> outputs =
      bwd ? std::vector<std::vector<char>*>{dq, dk, dv} : std::vector<std::vector<char>*>{out};
  for (auto* pair : outputs)
    for (size_t i = 0; i < pair[0].size() / es; ++i)
      diff = std::max(diff, double(fabsf(value(pair[0], i, dt) - value(pair[1], i, dt))));
  const double flop = 4.0 * B * H * double(Lq) * L * D / (causal && Lq > 1 ? 2 : 1) * (bwd ? 2.5 : 1);
  double med[2];
  for (int x = 0; x < 2; ++x) {
    std::sort(t[x].begin(), t[x].end());
    med[x] = t[x][t[x].size() / 2];
  }
  printf("%s B%d H%d/%d Lq%d Lk%d D%d %s %s, %d thread(s): A %.3f ms (best %.3f, %.1f GFLOP/s) | "
         "B %.3f ms (best %.3f, %.1f GFLOP/s) | B/A %.3f | max |A-B| %.2g\n",
         bwd ? "bwd" : "fwd", B, H, Hk, Lq, L, D, causal ? "causal" : "full", dt == 0 ? "f32" : dt == 1 ? "f16" : "bf16", threads,
         med[0] * 1e3, t[0][0] * 1e3, flop / med[0] / 1e9, med[1] * 1e3, t[1][0] * 1e3,
         flop / med[1] / 1e9, med[1] / med[0], diff);
  return 0;
}
