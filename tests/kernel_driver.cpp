// Runs the CPU kernels on inputs from files, without MLX, so a build for
// another architecture can run under an emulator (test_arm_build.py: the
// generic build for aarch64, the one Apple Silicon CPUs get, under
// qemu-aarch64). Linked with runtime.cpp built without the x86 kernels: its
// thread pool, and its dispatch, which must pick the generic build.
//
//   kernel_driver DIR
//
// DIR/params.txt holds FlashParams's fields, one per line ("name v1 v2 ..."),
// plus dtype (0 float32, 1 float16, 2 bfloat16), threads and the outputs
// wanted: backward, dmask, dalibi, dsinks (0/1). Inputs are raw
// little-endian files: q, k, v (dtype; strides as given), mask (uint8 or
// float32), alibi, sinks (float32), seqs (int32; packed: the outputs are one
// buffer for all B sequences, as the host's), and for the backward dout
// (dtype) and dlse (float32). Outputs, filled with NaN before the run so
// unwritten elements show: out, lse, and dq, dk, dv, dmask, dalibi, dsinks.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "flash_cpu.h"

using namespace flash_cpu;

static std::string dir;

static void die(const std::string& msg) {
  fprintf(stderr, "kernel_driver: %s\n", msg.c_str());
  exit(1);
}

// The bytes of DIR/name, or an empty buffer if there is no such file.
static std::vector<char> read_file(const char* name) {
  std::vector<char> buf;
  FILE* f = fopen((dir + "/" + name).c_str(), "rb");
  if (!f) return buf;
  fseek(f, 0, SEEK_END);
  buf.resize(ftell(f));
  fseek(f, 0, SEEK_SET);
  if (fread(buf.data(), 1, buf.size(), f) != buf.size()) die(std::string("short read: ") + name);
  fclose(f);
  return buf;
}

static void write_file(const char* name, const std::vector<char>& buf) {
  FILE* f = fopen((dir + "/" + name).c_str(), "wb");
  if (!f || fwrite(buf.data(), 1, buf.size(), f) != buf.size()) die(std::string("cannot write ") + name);
  fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 2) die("usage: kernel_driver DIR");
  dir = argv[1];
  FlashParams p{};
  int dtype = 0, threads = 1, backward = 0, want_dmask = 0, want_dalibi = 0, want_dsinks = 0;
  struct Field {
    const char* name;
    char kind; // i: int, l: fa_index_t, f: float, u: unsigned
    void* ptr;
    int n;
  };
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
      {"seed", 'u', p.seed, 2}, {"dtype", 'i', &dtype, 1}, {"threads", 'i', &threads, 1},
      {"backward", 'i', &backward, 1}, {"dmask", 'i', &want_dmask, 1},
      {"dalibi", 'i', &want_dalibi, 1}, {"dsinks", 'i', &want_dsinks, 1}};
  std::vector<char> text = read_file("params.txt");
  text.push_back('\0');
  for (char* line = strtok(text.data(), "\n"); line; line = strtok(nullptr, "\n")) {
    char name[64];
    int used;
    if (sscanf(line, "%63s%n", name, &used) != 1) continue;
    const Field* f = nullptr;
    for (const Field& x : fields)
      if (!strcmp(x.name, name)) f = &x;
    if (!f) die(std::string("unknown field ") + name);
    const char* s = line + used;
    for (int i = 0; i < f->n; ++i) {
      char* end;
      const double x = strtod(s, &end);
      if (end == s) die(std::string("too few values for ") + name);
      s = end;
      switch (f->kind) {
        case 'i': static_cast<int*>(f->ptr)[i] = int(x); break;
        case 'l': static_cast<fa_index_t*>(f->ptr)[i] = fa_index_t(x); break;
        case 'f': static_cast<float*>(f->ptr)[i] = float(x); break;
        default: static_cast<unsigned*>(f->ptr)[i] = unsigned(x); break;
      }
    }
  }

  setenv("MLX_FLASH_ATTN_NUM_THREADS", std::to_string(threads).c_str(), 1); // read by the pool
  if (strcmp(isa_name(), "generic")) die(std::string("dispatch chose ") + isa_name());
  const size_t es = dtype == 0 ? 4 : 2, nb = p.packed ? 1 : p.B;
  const size_t bh = nb * p.Hq, bhk = nb * p.Hk;
  const std::vector<char> q = read_file("q"), k = read_file("k"), v = read_file("v"),
                          mask = read_file("mask"), alibi = read_file("alibi"),
                          sinks = read_file("sinks"), seqs = read_file("seqs"),
                          dout = read_file("dout"), dlse = read_file("dlse");
  if (q.empty() || k.empty() || v.empty() || (p.has_seqs && seqs.empty()) ||
      (backward && (dout.empty() || dlse.empty())))
    die("missing input files");
  auto nan_filled = [](size_t bytes) { return std::vector<char>(bytes, char(0xff)); };
  std::vector<char> out = nan_filled(bh * p.Lq * p.Dv * es), lse = nan_filled(bh * p.Lq * 4);
  auto ptr = [](const std::vector<char>& b) -> const void* { return b.empty() ? nullptr : b.data(); };
  ForwardArgs fa{&p, DType(dtype), q.data(), k.data(), v.data(), ptr(mask),
                 static_cast<const float*>(ptr(alibi)), static_cast<const float*>(ptr(sinks)),
                 static_cast<const int32_t*>(ptr(seqs)), out.data(),
                 reinterpret_cast<float*>(lse.data())};
  flash_cpu::forward(fa);
  write_file("out", out);
  write_file("lse", lse);
  if (!backward) return 0;

  std::vector<char> dq = nan_filled(bh * p.Lq * p.D * es), dk = nan_filled(bhk * p.Lk * p.D * es),
                    dv = nan_filled(bhk * p.Lk * p.Dv * es),
                    dmask = nan_filled(want_dmask ? bh * p.Lq * p.Lk * 4 : 0),
                    dalibi = nan_filled(want_dalibi ? bh * 4 : 0),
                    dsinks = nan_filled(want_dsinks ? bh * 4 : 0);
  auto fptr = [](std::vector<char>& b) { return b.empty() ? nullptr : reinterpret_cast<float*>(b.data()); };
  BackwardArgs ba{fa, dout.data(), reinterpret_cast<const float*>(dlse.data()), dq.data(),
                  dk.data(), dv.data(), fptr(dmask), fptr(dalibi), fptr(dsinks)};
  flash_cpu::backward(ba);
  write_file("dq", dq);
  write_file("dk", dk);
  write_file("dv", dv);
  if (want_dmask) write_file("dmask", dmask);
  if (want_dalibi) write_file("dalibi", dalibi);
  if (want_dsinks) write_file("dsinks", dsinks);
  return 0;
}
