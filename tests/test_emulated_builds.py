"""CPU kernel builds this machine cannot run natively, run under emulators
against the float64 references, forward and backward, without MLX (the
kernels take inputs from files through kernel_driver.cpp):

- the generic build, the one Arm CPUs run (NEON), compiled for aarch64 by
  clang-19 (Apple's compiler family) for the M1 (-mcpu=apple-m1, the CPU
  clang targets by default on arm64 macOS) and by GCC (a Linux Arm
  machine's compiler), run under qemu-aarch64. This is Linux aarch64 in an
  emulator, not macOS on Apple hardware.
- the AVX-512 build (the one AVX-512 CPUs run), linked with no OS beneath
  it and run on bochscpu's emulated x86-64 CPU (bare_x86.py), one CPU;
- on the same CPU, the AVX512-BF16 build's kernels (bfloat16 block GEMMs
  on dot products, bf16_gemm.h) with its two AVX512-BF16 instructions in
  software (FA_SOFT_BF16): that CPU has no AVX512-BF16, nor may this
  machine, where test_isa_builds.py runs the real build.

The same driver built for this machine with the generic build checks the
harness itself."""

import importlib.util
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash_attn as fa
from reference import (DTYPES, assert_close, assert_grad_close, assert_lse_close, rand,
                       reference, reference_grads, to64)
from test_isa_builds import cmake_isa_flags, cmake_kernel_flags

torch = pytest.importorskip("torch")

ROOT = Path(__file__).parent.parent
CLANG = shutil.which("clang++-19")
QEMU = shutil.which("qemu-aarch64")
GCC_A64 = shutil.which("aarch64-linux-gnu-g++")
MUSL = Path("/usr/lib/x86_64-linux-musl/libc.a")  # Debian's musl-dev
BUILDS = ["native", "aarch64-clang", "aarch64-gcc", "avx512-bochs", "avx512bf16-bochs"]
DTYPE_CODE = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}


def run_jobs(*jobs):
    """Runs the command lines in parallel; each must succeed."""
    with ThreadPoolExecutor() as pool:
        for res in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs):
            assert res.returncode == 0, res.stderr[-3000:]


def compile_driver(out, compiler):
    """Builds kernel_driver with the kernels' generic build and the runtime
    (its pool and dispatch, no x86 builds); `compiler` is the command line up
    to the flags. The kernels get CMakeLists.txt's flags for it."""
    inc = ["-I", str(ROOT / "cpp" / "cpu"), "-I", str(ROOT / "kernels")]
    objs, jobs = [], []
    for src in ["cpp/cpu/flash_fwd.cpp", "cpp/cpu/flash_bwd.cpp", "cpp/cpu/runtime.cpp"]:
        obj = out.parent / f"{out.name}_{Path(src).stem}.o"
        objs.append(str(obj))
        jobs.append([*compiler, "-std=c++20", *cmake_kernel_flags(), "-DFA_ISA=generic", *inc,
                     "-c", str(ROOT / src), "-o", str(obj)])
    run_jobs(*jobs)
    run_jobs([*compiler, "-std=c++20", "-O2", "-static", "-pthread", *inc,
              str(ROOT / "tests" / "kernel_driver.cpp"), *objs, "-o", str(out)])


def compile_bare_driver(out, isa, *flags):
    """kernel_driver's bare build with the kernels of build `isa`, compiled
    with the AVX-512 build's flags and `flags`: a static ELF with no OS
    beneath it (no PIC, no stack protector, no CET), libc's few functions
    (memcpy, strtod, expf, ...) from musl."""
    bare = ["-fno-pic", "-fno-pie", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
            "-fcf-protection=none", "-std=c++20", "-I", str(ROOT / "cpp" / "cpu"), "-I",
            str(ROOT / "kernels")]
    obj = {f: str(out.parent / f"{out.name}_{f}.o") for f in ("driver", "flash_fwd", "flash_bwd")}
    jobs = [["g++", *bare, *cmake_kernel_flags(), *cmake_isa_flags()["avx512"], *flags,
             f"-DFA_ISA={isa}", "-c", str(ROOT / "cpp" / "cpu" / f"{f}.cpp"), "-o", obj[f]]
            for f in ("flash_fwd", "flash_bwd")]
    jobs.append(["g++", *bare, "-O2", "-fno-exceptions", f"-DFA_BARE={isa}", "-c",
                 str(ROOT / "tests" / "kernel_driver.cpp"), "-o", obj["driver"]])
    run_jobs(*jobs)
    objs = list(obj.values())
    run_jobs(["ld", "-static", "-nostdlib", "-e", "fa_bare_start", *objs, str(MUSL), "-o",
              str(out)])


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    """argv prefix of each driver: this machine's (g++), aarch64's (clang-19
    for the M1, and GCC; under qemu-aarch64) and the AVX-512 ones (on
    bochscpu, beside the bochscpu wheel's glibc shim), built in parallel;
    or, for a build this machine lacks the tools for, why not (see
    driver)."""
    missing = {}
    if CLANG is None or QEMU is None or GCC_A64 is None:
        missing.update(dict.fromkeys(["aarch64-clang", "aarch64-gcc"],
                                     "needs clang-19, g++-aarch64-linux-gnu and qemu-user"))
    if not MUSL.exists() or importlib.util.find_spec("bochscpu") is None:
        missing.update(dict.fromkeys(["avx512-bochs", "avx512bf16-bochs"],
                                     "needs musl-dev and bochscpu-python (the test extra)"))
    d = tmp_path_factory.mktemp("drivers")
    bochs = [sys.executable, str(ROOT / "tests" / "bare_x86.py")]
    if "avx512-bochs" not in missing:
        run_jobs(["gcc", "-shared", "-fPIC", "-O2", str(ROOT / "tests" / "isoc23_shim.c"), "-o",
                  str(d / "libisoc23.so")])
    builds = {"native": (lambda out: compile_driver(out, ["g++"]), []),
              "aarch64-clang": (lambda out: compile_driver(
                  out, [CLANG, "--target=aarch64-linux-gnu", "-mcpu=apple-m1"]), [QEMU]),
              "aarch64-gcc": (lambda out: compile_driver(out, [GCC_A64]), [QEMU]),
              "avx512-bochs": (lambda out: compile_bare_driver(out, "avx512"), bochs),
              "avx512bf16-bochs": (lambda out: compile_bare_driver(
                  out, "avx512bf16", "-DFA_SOFT_BF16"), bochs)}
    assert list(builds) == BUILDS
    todo = {name: b for name, b in builds.items() if name not in missing}
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda kv: kv[1][0](d / kv[0]), todo.items()))
    return {**missing, **{name: [*runner, str(d / name)] for name, (_, runner) in todo.items()}}


def driver(drivers, build):
    """The build's argv prefix; skips the test where the build's tools are missing."""
    if isinstance(drivers[build], str):
        pytest.skip(drivers[build] + " (apt-get install; pip install '.[test]')")
    return drivers[build]


def contiguous_strides(shape):
    return [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]


def raw(x):
    """An mx.array's elements as little-endian bytes (16-bit floats as their bits)."""
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).tobytes()
    if x.dtype == mx.bool_:
        return np.array(x).astype(np.uint8).tobytes()
    return np.array(x).tobytes()


def from_raw(buf, dtype, shape):
    if dtype == mx.bfloat16:
        bits = np.frombuffer(buf, np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    npt = {mx.float32: np.float32, mx.float16: np.float16}[dtype]
    return np.frombuffer(buf, npt).astype(np.float64).reshape(shape)


def run_kernels(driver, tmp, q, k, v, *, backward=None, mask=None, alibi_slopes=None,
                sinks=None, causal=False, window_size=(-1, -1), softcap=0.0, scale=None,
                dropout_p=0.0, seed=(0, 0), seqs=None, threads=2, heads_inner=False):
    """Runs the driver on q, k, v (B, H, L, D) and the options, as the host
    would set FlashParams for contiguous inputs, or with heads_inner for
    q, k, v stored (B, L, H, D) (mlx-lm's layout, transposed); backward =
    (dout, dlse); seqs: packed sequences [q_begin, q_len, k_begin, k_len]
    in one (1, H, L, D) buffer each (attention_varlen's layout). Returns
    the outputs as float64 arrays by name."""
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    wl, wr = window_size
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    prm = dict(B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D, Dv=Dv, gqa_ratio=Hq // Hk,
               q_strides=contiguous_strides(q.shape), k_strides=contiguous_strides(k.shape),
               v_strides=contiguous_strides(v.shape),
               scale=1.0 / np.sqrt(D) if scale is None else scale, softcap=softcap,
               q_offset=Lk - Lq, window_left=wl, window_right=wr, max_rows_q=Lq, max_rows_k=Lk,
               dropout_p=dropout_p, seed=list(seed), dtype=DTYPE_CODE[q.dtype], threads=threads,
               backward=int(backward is not None))
    files = dict(q=q, k=k, v=v)
    if heads_inner:
        for name, x in list(files.items()):
            _, H, L, E = x.shape
            files[name] = x.transpose(0, 2, 1, 3)
            prm[f"{name}_strides"] = [L * H * E, E, H * E, 1]
    full = (B, Hq, Lq, Lk)
    if mask is not None:
        boolean = mask.dtype == mx.bool_
        files["mask"] = mx.broadcast_to(mask if boolean else mask.astype(mx.float32), full)
        prm.update(mask_kind=1 if boolean else 2, mask_strides=contiguous_strides(full),
                   dmask=int(not boolean and backward is not None))
    for name, x in (("alibi", alibi_slopes), ("sinks", sinks)):
        if x is not None:
            files[name] = mx.broadcast_to(x.astype(mx.float32), (B, Hq))
            prm.update({f"has_{name}": 1, f"{name}_strides": [Hq, 1], f"d{name}": 1})
    if backward is not None:
        files["dout"], files["dlse"] = backward
        prm.update(do_strides=contiguous_strides((B, Hq, Lq, Dv)),
                   dlse_strides=contiguous_strides((B, Hq, Lq)))
    if seqs is not None:
        files["seqs"] = mx.array(np.array(seqs, dtype=np.int32))
        prm.update(B=len(seqs), has_seqs=1, packed=1, max_rows_q=max(s[1] for s in seqs),
                   max_rows_k=max(s[3] for s in seqs))
        for name in ("q_strides", "k_strides", "v_strides", "do_strides", "dlse_strides"):
            if name in prm:
                prm[name][0] = 0  # every sequence indexes the one buffer
    tmp.mkdir(parents=True, exist_ok=True)
    for name, x in files.items():
        (tmp / name).write_bytes(raw(mx.contiguous(x)))
    (tmp / "params").write_text("".join(
        f"{n} {' '.join(map(str, v)) if isinstance(v, list) else v}\n" for n, v in prm.items()))
    res = subprocess.run([*driver, str(tmp)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    dt = q.dtype
    outs = {"out": from_raw((tmp / "out").read_bytes(), dt, (B, Hq, Lq, Dv)),
            "lse": from_raw((tmp / "lse").read_bytes(), mx.float32, (B, Hq, Lq))}
    if backward is not None:
        for name, shape in (("dq", q.shape), ("dk", k.shape), ("dv", v.shape)):
            outs[name] = from_raw((tmp / name).read_bytes(), dt, shape)
        for name, shape in (("dmask", full), ("dalibi", (B, Hq)), ("dsinks", (B, Hq))):
            if (tmp / name).exists():
                outs[name] = from_raw((tmp / name).read_bytes(), mx.float32, shape)
    return outs


def summed_to(x, shape):
    """x summed over the axes broadcasting added or stretched from `shape`."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    return x.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True)


# The driver's name for the gradient of each reference_grads input.
GRAD_OUT = dict(q="dq", k="dk", v="dv", mask="dmask", alibi_slopes="dalibi", sinks="dsinks")


def assert_grads_close(outs, ref, dtype):
    for name, g in ref.items():
        out = GRAD_OUT[name]
        assert_grad_close(summed_to(outs[out], g.shape), g, dtype, out)


def per_head(rng, shape, lo, hi):
    return mx.array(rng.uniform(lo, hi, shape).astype(np.float32))


# (id, shapes B, Hq, Hk, Lq, Lk, D, Dv, options given rng); each runs forward
# and backward in every dtype, on 2 threads.
CASES = [
    *[(f"d{D}", (1, 2, 1, 67, 67, D, D), lambda rng: {}) for D in (32, 64, 80, 96, 128, 256)],
    ("lq1", (2, 4, 2, 1, 100, 64, 64), lambda rng: {}),
    ("l1", (1, 2, 2, 1, 1, 64, 64), lambda rng: {}),
    ("causal_lq_lt_lk", (2, 4, 2, 100, 130, 64, 64), lambda rng: dict(causal=True)),
    ("causal_lq_gt_lk", (2, 4, 2, 130, 100, 64, 64), lambda rng: dict(causal=True)),
    ("window", (1, 4, 1, 150, 170, 96, 96), lambda rng: dict(window_size=(5, 3))),
    ("dv_differs", (1, 2, 1, 70, 90, 64, 32), lambda rng: dict(causal=True)),
    # D not a multiple of 16; Dv = 64 + 48 (AVX-512's partial column chunk of 3 vectors)
    ("odd_head_dims", (1, 2, 1, 70, 90, 100, 112), lambda rng: dict(causal=True)),
    ("query_blocks_per_task", (2, 2, 2, 300, 300, 64, 64), lambda rng: dict(causal=True)),
    ("decode_split_keys", (1, 8, 2, 1, 3001, 128, 128), lambda rng: dict(window_size=(2000, -1))),
    ("softcap", (1, 2, 1, 70, 90, 64, 64), lambda rng: dict(softcap=2.0, scale=1.0)),
    ("alibi", (2, 4, 2, 70, 90, 64, 64),
     lambda rng: dict(alibi_slopes=per_head(rng, (4,), 0.01, 0.3))),
    ("sinks", (2, 4, 2, 70, 90, 64, 64), lambda rng: dict(sinks=per_head(rng, (2, 4), -1, 2))),
    ("bool_mask", (2, 2, 1, 70, 90, 64, 64),
     lambda rng: dict(mask=mx.array(rng.random((2, 1, 70, 90)) < 0.7))),
    ("additive_mask", (2, 2, 1, 70, 90, 64, 64),
     lambda rng: dict(mask=mx.array(rng.standard_normal((1, 2, 70, 90)).astype(np.float32)))),
    ("combined", (2, 4, 2, 100, 130, 80, 80),
     lambda rng: dict(causal=True, window_size=(40, -1), softcap=3.0,
                      alibi_slopes=per_head(rng, (4,), 0.01, 0.3),
                      sinks=per_head(rng, (2, 4), -1, 2))),
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_against_reference(drivers, tmp_path, rng, build, dtype, case):
    _, (B, Hq, Hk, Lq, Lk, D, Dv), make_opts = case
    opts = make_opts(rng)
    q, k = rand(rng, (B, Hq, Lq, D), dtype), rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    dout, dlse = rand(rng, (B, Hq, Lq, Dv), dtype), rand(rng, (B, Hq, Lq), mx.float32)
    outs = run_kernels(driver(drivers, build), tmp_path, q, k, v, backward=(dout, dlse), **opts)
    ref_out, ref_lse = reference(q, k, v, **opts)
    assert_close(outs["out"], ref_out, dtype)
    assert_lse_close(mx.array(outs["lse"]), ref_lse)
    assert_grads_close(outs, reference_grads(q, k, v, dout, dlse, **opts), dtype)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heads_inner_layout(drivers, tmp_path, rng, build, dtype):
    """q, k, v stored (B, L, H, D), as mlx-lm's projections leave them: row
    strides of H * D, so float32 V (at most 64 columns) is not read in
    place."""
    q, k, v = (rand(rng, (2, h, n, 64), dtype) for h, n in ((4, 100), (2, 130), (2, 130)))
    dout, dlse = rand(rng, (2, 4, 100, 64), dtype), rand(rng, (2, 4, 100), mx.float32)
    outs = run_kernels(driver(drivers, build), tmp_path, q, k, v, backward=(dout, dlse),
                       causal=True, heads_inner=True)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert_close(outs["out"], ref_out, dtype)
    assert_lse_close(mx.array(outs["lse"]), ref_lse)
    assert_grads_close(outs, reference_grads(q, k, v, dout, dlse, causal=True), dtype)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences(drivers, tmp_path, rng, build, dtype):
    """attention_varlen's packed layout: each sequence against the reference
    of its own rows (causal, bottom-right within the sequence, GQA)."""
    Hq, Hk, D = 4, 2, 64
    lq, lk = [37, 64, 0, 5], [50, 64, 9, 90]
    cq, ck = np.cumsum([0] + lq), np.cumsum([0] + lk)
    q, k, v = (rand(rng, (1, h, n, D), dtype)
               for h, n in ((Hq, cq[-1]), (Hk, ck[-1]), (Hk, ck[-1])))
    dout, dlse = rand(rng, (1, Hq, cq[-1], D), dtype), rand(rng, (1, Hq, cq[-1]), mx.float32)
    seqs = [[int(cq[b]), lq[b], int(ck[b]), lk[b]] for b in range(len(lq))]
    outs = run_kernels(driver(drivers, build), tmp_path, q, k, v, backward=(dout, dlse),
                       causal=True, seqs=seqs)
    for b in range(len(lq)):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if lq[b] == 0:
            assert np.all(outs["dk"][:, :, sk] == 0) and np.all(outs["dv"][:, :, sk] == 0)
            continue
        mine = {n: outs[n][:, :, sq] for n in ("out", "lse", "dq")}
        mine.update({n: outs[n][:, :, sk] for n in ("dk", "dv")})
        ref_out, ref_lse = reference(q[:, :, sq], k[:, :, sk], v[:, :, sk], causal=True)
        assert_close(mine["out"], ref_out, dtype)
        assert_lse_close(mx.array(mine["lse"]), ref_lse)
        ref = reference_grads(q[:, :, sq], k[:, :, sk], v[:, :, sk], dout[:, :, sq],
                              dlse[:, :, sq], causal=True)
        assert_grads_close(mine, ref, dtype)


@pytest.mark.parametrize("build", BUILDS)
def test_dropout_matches_this_machine(drivers, tmp_path, rng, build):
    """Dropout's mask is a hash of (seed, b, h, i, j): the build under test
    keeps the same probabilities as the tested extension on this machine."""
    B, Hq, Hk, L, D = 1, 4, 2, 90, 64
    q, k, v = (rand(rng, (B, h, L, D), mx.float32) for h in (Hq, Hk, Hk))
    dout, dlse = rand(rng, (B, Hq, L, D), mx.float32), mx.zeros((B, Hq, L))
    key = mx.random.key(7)
    seed = [int(x) for x in np.array(key).reshape(2)]
    outs = run_kernels(driver(drivers, build), tmp_path, q, k, v, backward=(dout, dlse),
                       causal=True, dropout_p=0.3, seed=seed)

    def loss(q, k, v):
        return (fa.attention(q, k, v, causal=True, dropout_p=0.3, key=key) * dout).sum()

    ours = fa.attention(q, k, v, causal=True, dropout_p=0.3, key=key)
    grads = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert np.abs(to64(ours) - to64(fa.attention(q, k, v, causal=True))).max() > 1e-2
    for name, want in zip(["out", "dq", "dk", "dv"], [ours, *grads]):
        assert_close(outs[name], to64(want), mx.float32, what=name)
