"""Every CPU kernel build this machine can run (generic, AVX2, AVX-512,
AVX-512 with AVX512-BF16 and AVX-512 with AMX), chosen through MLX_FLASH_ATTN_ISA in a fresh process and
checked against the float64 references by a slice of the forward and
backward tests. The default run only exercises the best build."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ISAS = ["generic", "avx2", "avx512", "avx512-bf16", "avx512-amx"]


def isa_in_child(isa):
    env = dict(os.environ, MLX_FLASH_ATTN_ISA=isa)
    # cwd: not the repository root, whose source folder would shadow the
    # installed package.
    out = subprocess.run([sys.executable, "-c", "import mlx_flash_attn as f; print(f.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True, cwd=TESTS)
    return out.stdout.strip()


@pytest.mark.parametrize("isa", ISAS)
def test_build_against_reference(isa):
    if isa_in_child(isa) != isa:
        # avx512 also runs on an emulated CPU in test_emulated_builds.py
        pytest.skip(f"this CPU cannot run the {isa} build")
    env = dict(os.environ, MLX_FLASH_ATTN_ISA=isa)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(TESTS / "test_forward.py"), str(TESTS / "test_backward.py"),
         "-k", "head_dims or combined or lengths or decode or rounded"],
        env=env, capture_output=True, text=True, cwd=TESTS)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


# --- Every build compiles with clang too: Apple's toolchain is clang, and
# Apple Silicon gets the generic build (NEON). Compiled for aarch64 Linux
# here, the nearest target whose headers Debian has (g++-aarch64-linux-gnu).
ROOT = TESTS.parent
CLANG = shutil.which("clang++-19")


def cmake_isa_flags():
    """FA_FLAGS_<isa> from CMakeLists.txt, ${...} references expanded."""
    text = (ROOT / "CMakeLists.txt").read_text()
    flags = {}
    for isa, value in re.findall(r"set\(FA_FLAGS_(\w+) ([^)]*)\)", text):
        value = re.sub(r"\$\{FA_FLAGS_(\w+)\}", lambda m: " ".join(flags[m.group(1)]), value)
        flags[isa] = value.replace('""', "").split()
    return flags


def cmake_kernel_flags():
    """FA_KERNEL_FLAGS from CMakeLists.txt: the flags of every kernel build."""
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(r"set\(FA_KERNEL_FLAGS ([^)]*)\)", text).group(1).split()


def clang_compile(source, *args):
    cmd = [CLANG, "-std=c++20", "-O0", "-c", "-o", os.devnull, "-Wno-psabi",
           "-I", str(ROOT / "cpp"), "-I", str(ROOT / "kernels"), *args, str(ROOT / source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0 and "error" not in res.stderr, res.stderr[-3000:]


CLANG_BUILDS = [("x86_64", isa) for isa in ["generic", "avx2", "avx512", "avx512bf16", "amx"]] + [
    ("aarch64", "generic")]


@pytest.mark.skipif(CLANG is None, reason="clang++-19 not installed (apt-get install clang-19)")
@pytest.mark.parametrize("arch,isa", CLANG_BUILDS, ids=lambda x: x)
def test_kernels_compile_with_clang(arch, isa):
    target = [f"--target={arch}-linux-gnu"]
    if arch == "aarch64" and not Path("/usr/aarch64-linux-gnu/include").is_dir():
        pytest.fail("aarch64 headers missing: apt-get install g++-aarch64-linux-gnu")
    flags = cmake_isa_flags().get(isa, []) if arch == "x86_64" else []
    for source in ["cpp/cpu/flash_fwd.cpp", "cpp/cpu/flash_bwd.cpp"]:
        clang_compile(source, *target, f"-DFA_ISA={isa}", *flags)
    runtime_defs = ["-DFA_HAVE_X86_KERNELS"] if arch == "x86_64" else []
    clang_compile("cpp/cpu/runtime.cpp", *target, *runtime_defs)


# The GEMM loops must compile to fused multiply-adds: clang's default once
# left every acc += q * k a multiply and an add (see FA_KERNEL_FLAGS).
# qk_rows<ROWS> (never inlined) of each clang build, with CMakeLists.txt's
# flags: (arch, isa, ROWS, fused, separate instructions).
FMA_BUILDS = [("x86_64", "avx2", 6, "vfmadd", ("vmulps", "vaddps")),
              ("x86_64", "avx512", 4, "vfmadd", ("vmulps", "vaddps")),
              ("aarch64", "generic", 6, "fmla", ("fmul", "fadd"))]


@pytest.mark.skipif(CLANG is None, reason="clang++-19 not installed (apt-get install clang-19)")
@pytest.mark.parametrize("arch,isa,rows,fused,separate", FMA_BUILDS,
                         ids=[f"{arch}-{isa}" for arch, isa, *_ in FMA_BUILDS])
def test_gemm_loops_fuse_multiply_adds_with_clang(arch, isa, rows, fused, separate):
    flags = cmake_isa_flags().get(isa, []) if arch == "x86_64" else []
    cmd = [CLANG, f"--target={arch}-linux-gnu", "-std=c++20", *cmake_kernel_flags(), *flags,
           f"-DFA_ISA={isa}", "-I", str(ROOT / "cpp" / "cpu"), "-I", str(ROOT / "kernels"),
           "-S", "-o", "-", str(ROOT / "cpp/cpu/flash_fwd.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    name = rf"_ZN9flash_cpu{len(isa)}{isa}12_GLOBAL__N_17qk_rowsILi{rows}E\w*"
    body = re.search(rf"^{name}:.*?^\.Lfunc_end", res.stdout, re.S | re.M)
    assert body, f"qk_rows<{rows}> not found in the {arch} {isa} assembly"
    ops = re.findall(r"^\s+(\w+)", body.group(0), re.M)
    n_fused = sum(op.startswith(fused) for op in ops)
    n_separate = sum(op in separate for op in ops)
    assert n_fused >= 12 and n_separate == 0, (
        f"qk_rows<{rows}>: {n_fused} {fused}, {n_separate} of {separate}")
