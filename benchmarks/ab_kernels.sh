#!/bin/bash
# Builds the CPU kernels of two git revisions into one binary
# (benchmarks/ab_kernels.cpp) and times them against each other, calls
# alternated (one thread unless told). REV_B "work" (the default) is the
# working tree.
#
#   benchmarks/ab_kernels.sh REV_A [REV_B] -- B H L D causal dtype iters [bwd [threads]]
#   e.g. benchmarks/ab_kernels.sh HEAD~1 -- 1 8 1024 64 0 0 20
#
# Kernel flags: CMakeLists.txt's FA_KERNEL_FLAGS plus $FA_FLAGS, default AVX2 +
# FMA + F16C (CMakeLists.txt's avx2). Compiler: $FA_CXX, default g++ (e.g.
# FA_CXX=clang++-19, Apple's compiler family).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
rev_a=$1
shift
rev_b=work
if [ "${1:-}" != "--" ]; then rev_b=$1; shift; fi
[ "${1:-}" = "--" ] && shift
flags=${FA_FLAGS:--mavx2 -mfma -mf16c}
cxx=${FA_CXX:-g++}
kernel_flags=$(sed -n 's/^set(FA_KERNEL_FLAGS \(.*\))$/\1/p' "$repo/CMakeLists.txt")
[ -n "$kernel_flags" ] || { echo "no FA_KERNEL_FLAGS in CMakeLists.txt" >&2; exit 1; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for side in a b; do
  rev=$rev_a
  [ $side = b ] && rev=$rev_b
  mkdir -p "$dir/$side"
  if [ "$rev" = work ]; then
    cp -r "$repo/cpp" "$repo/kernels" "$dir/$side/"
  else
    git -C "$repo" archive "$rev" cpp/cpu kernels | tar -x -C "$dir/$side"
  fi
  for f in flash_fwd flash_bwd; do
    "$cxx" $kernel_flags $flags -std=c++20 -DFA_ISA=v$side -I"$dir/$side/kernels" \
      -I"$dir/$side/cpp/cpu" -c "$dir/$side/cpp/cpu/$f.cpp" -o "$dir/${side}_$f.o" &
  done
done
wait
"$cxx" -O2 -std=c++20 -pthread -I"$repo/kernels" -I"$repo/cpp/cpu" "$here/ab_kernels.cpp" "$dir"/*.o \
  -o "$dir/ab_kernels"
"$dir/ab_kernels" "$@"
