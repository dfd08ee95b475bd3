// Interface between the host code and the CPU kernels. Deliberately free of
// MLX and standard-library templates: the kernel translation unit is compiled
// once per instruction set (see CMakeLists.txt), and sharing inline template
// code with differently-compiled units could leak AVX-512 code into paths
// that run on any x86-64.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flash_params.h"

namespace flash_cpu {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct ForwardArgs {
  const FlashParams* p;
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  const void* mask;   // uint8 (bool) or float32, per p->mask_kind; else null
  const float* alibi; // slopes, when p->has_alibi
  const float* sinks; // sink logits, when p->has_sinks
  const int32_t* seqs; // (B, 4) sequences, when p->has_seqs
  void* out;          // (B, Hq, Lq, Dv) contiguous, input dtype
  float* lse;         // (B, Hq, Lq) contiguous, natural log
};

struct BackwardArgs {
  ForwardArgs fwd;     // the forward's inputs; fwd.out and fwd.lse are its outputs
  const void* dout;    // cotangent of out, strides p->do_strides, input dtype
  const float* dlse;   // cotangent of lse, strides p->dlse_strides
  void* dq;            // (B, Hq, Lq, D) contiguous, input dtype
  void* dk;            // (B, Hk, Lk, D)
  void* dv;            // (B, Hk, Lk, Dv)
  float* dmask;        // (B, Hq, Lq, Lk) gradient of an additive mask, or null
  float* dalibi;       // (B, Hq) gradient of the ALiBi slopes, or null
  float* dsinks;       // (B, Hq) gradient of the sinks, or null
};

// Runs the forward pass with the best kernel this CPU supports.
void forward(const ForwardArgs& args);

// The FlashAttention-2 backward pass: recomputes P from Q, K and the LSE.
void backward(const BackwardArgs& args);

// Name of the instruction set forward() uses on this CPU ("avx512", ...).
const char* isa_name();

// --- Services the kernels use, implemented in plain C++ (runtime.cpp). ---

// Calls fn(ctx, i) for i in [0, n) on a pool sized to the machine's cores;
// tasks are handed out dynamically in increasing i.
void parallel_for(int64_t n, void (*fn)(void* ctx, int64_t i), void* ctx);

// The number of threads parallel_for runs on (the caller included).
int num_threads();

// A 64-byte aligned per-thread scratch buffer of at least nbytes, reused
// across calls on the same thread; one per slot: a task's working memory
// (carve_scratch), the K/V copies of the head a thread works on
// (own_heads), which outlive many tasks, and the calling thread's wave of
// copies (wave_buffer).
enum ScratchSlot { kTaskScratch, kCopyScratch, kWaveScratch, kScratchSlots };
void* thread_scratch(size_t nbytes, int slot = kTaskScratch);

// One definition per instruction set, in flash_fwd.cpp and flash_bwd.cpp.
#define FA_DECLARE_ISA(isa)                \
  namespace isa {                          \
  void forward(const ForwardArgs& args);   \
  void backward(const BackwardArgs& args); \
  }
FA_DECLARE_ISA(amx) // AVX-512 plus AMX tiles for bfloat16
FA_DECLARE_ISA(avx512bf16) // AVX-512 plus AVX512-BF16 dot products for bfloat16
FA_DECLARE_ISA(avx512)
FA_DECLARE_ISA(avx2)
FA_DECLARE_ISA(generic)
#undef FA_DECLARE_ISA

} // namespace flash_cpu
