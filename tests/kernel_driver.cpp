// Runs the CPU kernels on inputs given as named buffers, without MLX, so a
// build for another CPU can run under an emulator (test_emulated_builds.py):
// the generic build for aarch64 (the one Apple Silicon CPUs get) under
// qemu-aarch64, and the AVX-512 build on an emulated x86-64 CPU with no OS
// (bochscpu). Two front ends share run_driver():
//
//   hosted (default)  kernel_driver DIR: buffers are the files in DIR. Linked
//                     with runtime.cpp built without the x86 kernels: its
//                     thread pool, and its dispatch, which must pick the
//                     generic build.
//   bare (FA_BARE)    the entry point gets the buffers packed in memory
//                     (bare_x86.py's layout) and a heap; the runtime's
//                     services are stood in for below (one CPU, tasks run
//                     in turn), the kernels are FA_BARE's build, and libc's
//                     memcpy, strtod and libm come from musl.
//
// params holds FlashParams's fields, one per line ("name v1 v2 ..."), plus
// dtype (0 float32, 1 float16, 2 bfloat16), threads and the outputs wanted:
// backward, dmask, dalibi, dsinks (0/1). Inputs are raw little-endian: q, k,
// v (dtype; strides as given), mask (uint8 or float32), alibi, sinks
// (float32), seqs (int32; packed: the outputs are one buffer for all B
// sequences, as the host's), and for the backward dout (dtype) and dlse
// (float32). Outputs, filled with NaN before the run so unwritten elements
// show: out, lse, and dq, dk, dv, dmask, dalibi, dsinks.
#include <stdlib.h>
#include <string.h>

#include "flash_cpu.h"

using namespace flash_cpu;

namespace {

struct Buffer {
  char* data;
  size_t size;
};

// What a front end provides. fail() does not return.
struct Io {
  Buffer (*read)(const char* name); // {nullptr, 0} if absent
  void (*write)(const char* name, Buffer b);
  void* (*alloc)(size_t bytes);
  void (*fail)(const char* msg, const char* what);
  void (*set_threads)(int n);
  const char* isa; // the build dispatch must choose; null: no dispatch
};

void parse_params(const Io& io, char* text, FlashParams& p, int* ints) {
  struct Field {
    const char* name;
    char kind; // i: int, l: fa_index_t, f: float, u: unsigned
    void* ptr;
    int n;
  };
  // ints: dtype, threads, backward, dmask, dalibi, dsinks
  const Field fields[] = {
      {"B", 'i', &p.B, 1}, {"Hq", 'i', &p.Hq, 1}, {"Hk", 'i', &p.Hk, 1}, {"Lq", 'i', &p.Lq, 1},
      {"Lk", 'i', &p.Lk, 1}, {"D", 'i', &p.D, 1}, {"Dv", 'i', &p.Dv, 1},
      {"gqa_ratio", 'i', &p.gqa_ratio, 1}, {"q_strides", 'l', p.q_strides, 4},
      {"k_strides", 'l', p.k_strides, 4}, {"v_strides", 'l', p.v_strides, 4},
      {"mask_strides", 'l', p.mask_strides, 4}, {"alibi_strides", 'l', p.alibi_strides, 2},
      {"sinks_strides", 'l', p.sinks_strides, 2}, {"do_strides", 'l', p.do_strides, 4},
      {"dlse_strides", 'l', p.dlse_strides, 3}, {"scale", 'f', &p.scale, 1},
      {"softcap", 'f', &p.softcap, 1}, {"q_offset", 'i', &p.q_offset, 1},
      {"window_left", 'i', &p.window_left, 1}, {"window_right", 'i', &p.window_right, 1},
      {"mask_kind", 'i', &p.mask_kind, 1}, {"has_alibi", 'i', &p.has_alibi, 1},
      {"has_sinks", 'i', &p.has_sinks, 1}, {"has_seqs", 'i', &p.has_seqs, 1},
      {"packed", 'i', &p.packed, 1}, {"max_rows_q", 'i', &p.max_rows_q, 1},
      {"max_rows_k", 'i', &p.max_rows_k, 1}, {"dropout_p", 'f', &p.dropout_p, 1},
      {"seed", 'u', p.seed, 2}, {"dtype", 'i', &ints[0], 1}, {"threads", 'i', &ints[1], 1},
      {"backward", 'i', &ints[2], 1}, {"dmask", 'i', &ints[3], 1},
      {"dalibi", 'i', &ints[4], 1}, {"dsinks", 'i', &ints[5], 1}};
  for (char* line = strtok(text, "\n"); line; line = strtok(nullptr, "\n")) {
    char* s = line + strcspn(line, " ");
    if (*s) *s++ = '\0';
    const Field* f = nullptr;
    for (const Field& x : fields)
      if (!strcmp(x.name, line)) f = &x;
    if (!f) io.fail("unknown field", line);
    for (int i = 0; i < f->n; ++i) {
      char* end;
      const double x = strtod(s, &end);
      if (end == s) io.fail("too few values for", f->name);
      s = end;
      switch (f->kind) {
        case 'i': static_cast<int*>(f->ptr)[i] = int(x); break;
        case 'l': static_cast<fa_index_t*>(f->ptr)[i] = fa_index_t(x); break;
        case 'f': static_cast<float*>(f->ptr)[i] = float(x); break;
        default: static_cast<unsigned*>(f->ptr)[i] = unsigned(x); break;
      }
    }
  }
}

void run_driver(const Io& io) {
  const Buffer text = io.read("params");
  if (!text.data) io.fail("missing input", "params");
  char* params = static_cast<char*>(io.alloc(text.size + 1));
  memcpy(params, text.data, text.size);
  params[text.size] = '\0';
  FlashParams p{};
  int ints[6] = {0, 1, 0, 0, 0, 0};
  parse_params(io, params, p, ints);
  const int dtype = ints[0], backward = ints[2];
  const bool want_dmask = ints[3], want_dalibi = ints[4], want_dsinks = ints[5];
  io.set_threads(ints[1]);
  if (io.isa && strcmp(isa_name(), io.isa)) io.fail("dispatch chose", isa_name());

  const size_t es = dtype == 0 ? 4 : 2, nb = p.packed ? 1 : p.B;
  const size_t bh = nb * p.Hq, bhk = nb * p.Hk;
  const Buffer q = io.read("q"), k = io.read("k"), v = io.read("v"), mask = io.read("mask"),
               alibi = io.read("alibi"), sinks = io.read("sinks"), seqs = io.read("seqs"),
               dout = io.read("dout"), dlse = io.read("dlse");
  if (!q.data || !k.data || !v.data || (p.has_seqs && !seqs.data) ||
      (backward && (!dout.data || !dlse.data)))
    io.fail("missing input", "q, k, v, seqs, dout or dlse");
  auto nan_filled = [&](size_t bytes) {
    Buffer b{static_cast<char*>(io.alloc(bytes)), bytes};
    memset(b.data, 0xff, bytes);
    return b;
  };
  const Buffer out = nan_filled(bh * p.Lq * p.Dv * es), lse = nan_filled(bh * p.Lq * 4);
  ForwardArgs fa{&p, DType(dtype), q.data, k.data, v.data, mask.data,
                 reinterpret_cast<const float*>(alibi.data),
                 reinterpret_cast<const float*>(sinks.data),
                 reinterpret_cast<const int32_t*>(seqs.data), out.data,
                 reinterpret_cast<float*>(lse.data)};
  flash_cpu::forward(fa);
  io.write("out", out);
  io.write("lse", lse);
  if (!backward) return;

  const Buffer dq = nan_filled(bh * p.Lq * p.D * es), dk = nan_filled(bhk * p.Lk * p.D * es),
               dv = nan_filled(bhk * p.Lk * p.Dv * es),
               dmask = nan_filled(want_dmask ? bh * p.Lq * p.Lk * 4 : 0),
               dalibi = nan_filled(want_dalibi ? bh * 4 : 0),
               dsinks = nan_filled(want_dsinks ? bh * 4 : 0);
  auto fptr = [](Buffer b) { return b.size ? reinterpret_cast<float*>(b.data) : nullptr; };
  BackwardArgs ba{fa, dout.data, reinterpret_cast<const float*>(dlse.data), dq.data,
                  dk.data, dv.data, fptr(dmask), fptr(dalibi), fptr(dsinks)};
  flash_cpu::backward(ba);
  io.write("dq", dq);
  io.write("dk", dk);
  io.write("dv", dv);
  if (want_dmask) io.write("dmask", dmask);
  if (want_dalibi) io.write("dalibi", dalibi);
  if (want_dsinks) io.write("dsinks", dsinks);
}

} // namespace

#if !defined(FA_BARE)
#include <stdio.h>

#include <string>

static std::string dir;

static void die(const char* msg, const char* what) {
  fprintf(stderr, "kernel_driver: %s %s\n", msg, what);
  exit(1);
}

static Buffer read_file(const char* name) {
  FILE* f = fopen((dir + "/" + name).c_str(), "rb");
  if (!f) return {nullptr, 0};
  fseek(f, 0, SEEK_END);
  Buffer b{nullptr, size_t(ftell(f))};
  b.data = static_cast<char*>(malloc(b.size));
  fseek(f, 0, SEEK_SET);
  if (fread(b.data, 1, b.size, f) != b.size) die("short read:", name);
  fclose(f);
  return b;
}

static void write_file(const char* name, Buffer b) {
  FILE* f = fopen((dir + "/" + name).c_str(), "wb");
  if (!f || fwrite(b.data, 1, b.size, f) != b.size) die("cannot write", name);
  fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 2) die("usage:", "kernel_driver DIR");
  dir = argv[1];
  const Io io{read_file, write_file, malloc, die,
              [](int n) { setenv("MLX_FLASH_ATTN_NUM_THREADS", std::to_string(n).c_str(), 1); },
              "generic"};
  run_driver(io);
  return 0;
}

#else
// The entry point (bare_x86.py sets the registers): `io` holds a header
// (status, message) and then records {name[16], size, data padded to 64
// bytes} up to one with an empty name; outputs are appended as records
// after the inputs. Ends with HLT.
namespace {
struct Record {
  char name[16];
  uint64_t size;
  char pad[40];
};
char* io_base;
char* io_end;
char* heap_next;
char* heap_end;
char* records_end; // the record with the empty name

Record* first_record() { return reinterpret_cast<Record*>(io_base + 64); }
Record* next_record(Record* r) {
  return reinterpret_cast<Record*>(reinterpret_cast<char*>(r + 1) + (r->size + 63) / 64 * 64);
}

[[noreturn]] void halt() {
  for (;;) asm volatile("hlt");
}

[[noreturn]] void bare_fail(const char* msg, const char* what) {
  char* text = io_base + 8;
  size_t n = 0;
  const char* parts[] = {msg, " ", what};
  for (const char* s : parts)
    for (; *s && n < 55; ++s) text[n++] = *s;
  text[n] = '\0';
  *reinterpret_cast<uint64_t*>(io_base) = 2;
  halt();
}

Buffer bare_read(const char* name) {
  for (Record* r = first_record(); r->name[0]; r = next_record(r))
    if (!strncmp(r->name, name, sizeof(r->name))) return {reinterpret_cast<char*>(r + 1), r->size};
  return {nullptr, 0};
}

void bare_write(const char* name, Buffer b) {
  Record* r = reinterpret_cast<Record*>(records_end);
  char* end = reinterpret_cast<char*>(r + 1) + (b.size + 63) / 64 * 64;
  if (end + sizeof(Record) > io_end) bare_fail("no room for output", name);
  memset(r, 0, sizeof(Record));
  strncpy(r->name, name, sizeof(r->name));
  r->size = b.size;
  memcpy(r + 1, b.data, b.size);
  records_end = end;
  memset(records_end, 0, sizeof(Record));
}

void* bare_alloc(size_t bytes) {
  char* p = heap_next;
  if (bytes > size_t(heap_end - p)) bare_fail("out of memory", "");
  heap_next = p + (bytes + 63) / 64 * 64;
  return p;
}
} // namespace

// The kernels' allocations (alloc_aligned) and their bad_alloc path.
extern "C" void* aligned_alloc(size_t, size_t bytes) { return bare_alloc(bytes); }
extern "C" void free(void*) {}
extern "C" void* __cxa_allocate_exception(size_t) { bare_fail("out of memory", ""); }
extern "C" void __cxa_throw(void*, void*, void (*)(void*)) { bare_fail("throw", ""); }
extern "C" void _ZNSt9bad_allocD1Ev() {}
asm(".globl _ZTISt9bad_alloc, _ZTVSt9bad_alloc\n.section .rodata\n"
    "_ZTISt9bad_alloc: .quad 0, 0, 0\n_ZTVSt9bad_alloc: .quad 0, 0, 0, 0, 0\n.text");

// runtime.cpp's services on one CPU. num_threads() is the threads asked
// for, so the work is split as on that many cores, then run in turn.
namespace flash_cpu {
namespace {
int threads = 1;
char* scratch[kScratchSlots] = {};
size_t scratch_size[kScratchSlots] = {};
void bare_set_threads(int n) { threads = n; }
} // namespace
void parallel_for(int64_t n, void (*fn)(void* ctx, int64_t i), void* ctx) {
  for (int64_t i = 0; i < n; ++i) fn(ctx, i);
}
int num_threads() { return threads; }
void* thread_scratch(size_t nbytes, int slot) {
  if (nbytes > scratch_size[slot]) {
    scratch[slot] = static_cast<char*>(bare_alloc(nbytes));
    scratch_size[slot] = nbytes;
  }
  return scratch[slot];
}
#define FA_STR2(x) #x
#define FA_STR(x) FA_STR2(x)
void forward(const ForwardArgs& a) { FA_BARE::forward(a); }
void backward(const BackwardArgs& a) { FA_BARE::backward(a); }
const char* isa_name() { return FA_STR(FA_BARE); }
} // namespace flash_cpu

extern "C" [[noreturn]] void fa_bare_start(char* io, size_t io_size, char* heap, size_t heap_size) {
  io_base = io;
  io_end = io + io_size;
  heap_next = heap;
  heap_end = heap + heap_size;
  Record* r = first_record();
  while (r->name[0]) r = next_record(r);
  records_end = reinterpret_cast<char*>(r);
  // No dispatch: the kernels are FA_BARE's build, whatever the CPU.
  const Io bare{bare_read, bare_write, bare_alloc, bare_fail, flash_cpu::bare_set_threads,
                nullptr};
  run_driver(bare);
  *reinterpret_cast<uint64_t*>(io) = 1;
  halt();
}
#endif
