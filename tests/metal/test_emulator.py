"""Tests of the Metal-on-CPU emulator itself (msl.py + shim + runtime)."""
import time
from pathlib import Path

import numpy as np
import pytest

import msl

K = Path(__file__).parent / "kernels_test"
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.metal,
    pytest.mark.skipif(msl.clang() is None, reason="clang++-19 is not installed (apt-get install -y clang-19)"),
]


def u32(v):
    return np.uint32(v).tobytes()


# ---------------------------------------------------------------- correctness

def test_threadgroup_reduction(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    part = np.full(8, np.nan, np.float32)
    kern = msl.compile(K / "reduce.metal", name="reduce_sum_128")
    res = kern.launch(grid=8, threadgroup=128, buffers=[x, part, u32(len(x))])
    xp = np.concatenate([x, np.zeros(24, np.float32)]).reshape(8, 128)
    np.testing.assert_allclose(part, xp.sum(1), rtol=1e-5, atol=1e-5)
    assert res.counters[0].read == x.nbytes  # each element read once; padding not read
    assert res.counters[1].written == part.nbytes and res.counters[1].read == 0


def test_threadgroup_buffer_parameter(rng):
    x = rng.standard_normal(4 * 64).astype(np.float32)
    part = np.zeros(4, np.float32)
    kern = msl.compile(K / "reduce.metal", name="reduce_sum_dyn")
    kern.launch(grid=4, threadgroup=64, buffers=[x, part], threadgroup_memory={0: 64 * 4}, race_check=True)
    np.testing.assert_allclose(part, x.reshape(4, 64).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,name", [(np.float32, "softmax_float32"), (np.float16, "softmax_float16")])
def test_simd_softmax(rng, dtype, name):
    rows, cols = 6, 100
    x = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    y = np.zeros_like(x)
    msl.compile(K / "softmax.metal", name=name).launch(
        grid=rows, threadgroup=32, buffers=[x, y, np.int32(cols).tobytes()])
    xf = x.astype(np.float64)
    ref = np.exp(xf - xf.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    tol = 1e-6 if dtype == np.float32 else 1e-3
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol)


def test_simd_collectives(rng):
    x = rng.standard_normal(64).astype(np.float32)
    out = np.zeros((64, 12), np.float32)
    iout = np.zeros((64, 4), np.int32)
    msl.compile(K / "simd_ops.metal").launch(grid=1, threadgroup=64, buffers=[x, out, iout])
    for g in range(2):
        v = x[32 * g:32 * g + 32]
        o, io = out[32 * g:32 * g + 32], iout[32 * g:32 * g + 32]
        lane = np.arange(32)
        np.testing.assert_allclose(o[:, 0], v.sum(), rtol=1e-5)
        assert (o[:, 1] == v.max()).all() and (o[:, 2] == v.min()).all()
        np.testing.assert_allclose(o[:, 3], np.cumsum(v), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(o[:, 4], np.cumsum(v) - v, rtol=1e-5, atol=1e-6)
        assert (o[:, 5] == v[(lane * 7) % 32]).all()
        assert (o[:, 6] == np.where(lane + 3 < 32, v[np.minimum(lane + 3, 31)], v)).all()
        assert (o[:, 7] == np.where(lane >= 5, v[np.maximum(lane - 5, 0)], v)).all()
        assert (o[:, 8] == v[9]).all()
        assert (o[:, 9] == v[lane ^ 6]).all()
        np.testing.assert_allclose(o[:, 10], 2 * v.sum(), rtol=1e-5)
        assert (o[:, 11] == v.astype(np.float16).max().astype(np.float32)).all()
        assert (io[:, 0] == 1).all()
        assert (io[:, 1] == int((v > 0.5).any())).all()
        ballot = sum(1 << i for i in range(32) if v[i] > 0)
        assert (io[:, 2].astype(np.uint32) == np.uint32(ballot)).all()
        assert (io[:, 3] == 496).all()


@pytest.mark.parametrize("name,dtype", [("gemm_float", np.float32), ("gemm_half", np.float16)])
def test_simdgroup_matrix_gemm(rng, name, dtype):
    M, N, Kd = 64, 96, 40
    A = rng.standard_normal((M, Kd)).astype(dtype)
    B = rng.standard_normal((Kd, N)).astype(dtype)
    C = np.full((M, N), np.nan, np.float32)
    res = msl.compile(K / "gemm.metal", name=name).launch(
        grid=(N // 32, M // 32), threadgroup=128, buffers=[A, B, C, np.array([M, N, Kd, 0], np.uint32)])
    ref = A.astype(np.float64) @ B.astype(np.float64)
    np.testing.assert_allclose(C, ref, rtol=1e-4, atol=1e-4)
    # Each simdgroup reads a 16-row strip of A and a 16-column strip of B once.
    item = np.dtype(dtype).itemsize
    assert res.counters[0].read == (N // 16) * M * Kd * item
    assert res.counters[1].read == (M // 16) * N * Kd * item
    assert res.counters[2].written == C.nbytes and res.counters[2].read == 0


def test_simdgroup_matrix_thread_elements(rng):
    A = rng.standard_normal((8, 8)).astype(np.float32)
    B = rng.standard_normal((8, 8)).astype(np.float32)
    C = np.zeros((8, 8), np.float32)
    msl.compile(K / "gemm.metal", name="mma_elements").launch(
        grid=1, threadgroup=32, buffers=[A, np.ascontiguousarray(B.T), C])
    np.testing.assert_allclose(C, A @ B, rtol=1e-5, atol=1e-5)


def test_half_rounds_every_operation(rng):
    a = (rng.standard_normal(256) * 10).astype(np.float16)
    b = (rng.standard_normal(256) * 10).astype(np.float16)
    out = np.zeros(512, np.float16)
    msl.compile(K / "types.metal", name="half_ops").launch(grid=8, threadgroup=32, buffers=[a, b, out])
    t = a * b  # numpy float16 ops round each result to half
    per_op = (t + a) - b
    np.testing.assert_array_equal(out[0::2], per_op)
    once = ((a.astype(np.float32) * b + a) - b).astype(np.float16)
    assert (per_op != once).any()  # the test can tell per-op from single rounding
    np.testing.assert_array_equal(out[1::2], a * b + np.float16(0.5))


def test_vector_constructors_convert():
    iv = np.array([[1, -2, 3, 4], [5, 6, 7, 8]], np.int32)
    out = np.zeros((2, 4, 4), np.float32)
    bits = np.zeros(2, np.uint32)
    bf = np.zeros(2, np.uint16)
    msl.compile(K / "types.metal", name="vectors").launch(grid=1, threadgroup=2, buffers=[iv, out, bits, bf])
    f = iv.astype(np.float32)
    np.testing.assert_array_equal(out[:, 0], f)  # converted, not bit-cast
    np.testing.assert_array_equal(out[:, 1], np.stack([f[:, 0], f[:, 1], f[:, 3], f[:, 3]], 1))
    np.testing.assert_array_equal(out[:, 2], np.stack([f[:, 2], f[:, 1], f[:, 0], np.full(2, 7.5)], 1))
    np.testing.assert_array_equal(out[:, 3], f)
    assert bits[0] == np.float32(1).view(np.uint32)
    assert bits[1] == 0xFFFFFFFF
    # 1.00390625 * 1 is halfway between bfloat 1.0 and 1.0078125: ties to even.
    assert bf[0] == 0x3F80
    assert bf[1] == (np.float32(5 * 1.00390625).view(np.uint32) + 0x7FFF + 0) >> 16


def test_function_constants_and_host_names():
    x = np.arange(16, dtype=np.float32)
    y = np.zeros(16, np.float32)
    msl.compile(K / "fc.metal", name="affine_f32_s1", constants={0: False}).launch(
        grid=1, threadgroup=16, buffers=[x, y])
    np.testing.assert_array_equal(y, x)  # bias undefined: has_bias false
    msl.compile(K / "fc.metal", name="affine_f32_s1", constants={0: True, 1: 3, "factor": 2.0}).launch(
        grid=1, threadgroup=16, buffers=[x, y])
    np.testing.assert_array_equal(y, x * 2 + 3 + 1000)
    msl.compile(K / "fc.metal", name="affine_f32_s1", constants={"do_scale": False, "bias": -1}).launch(
        grid=1, threadgroup=16, buffers=[x, y])
    np.testing.assert_array_equal(y, x - 1)
    xh = np.arange(32, dtype=np.float16)
    yh = np.zeros(16, np.float16)
    msl.compile(K / "fc.metal", name="affine_f16_s2", constants={0: True, 2: 0.5}).launch(
        grid=2, threadgroup=8, buffers=[xh, yh])
    np.testing.assert_array_equal(yh, xh[::2] * np.float16(0.5))
    with pytest.raises(msl.CompileError, match="no kernel named 'affine_f32_s2'"):
        msl.compile(K / "fc.metal", name="affine_f32_s2")


def _host_layout(tmp_path):
    """sizeof/offsetof of FlashParams as the host C++ compiler lays it out."""
    import subprocess

    src = tmp_path / "layout.cpp"
    src.write_text('#include <cstddef>\n#include <cstdio>\n#include "flash_params.h"\n'
                   'int main() { printf("%zu %zu %zu %zu %zu", sizeof(FlashParams), offsetof(FlashParams, B), '
                   'offsetof(FlashParams, scale), offsetof(FlashParams, k_strides), '
                   'offsetof(FlashParams, has_sinks)); }\n')
    exe = tmp_path / "layout"
    subprocess.run([msl.clang(), "-std=c++17", "-I", str(REPO / "kernels"), str(src), "-o", str(exe)], check=True)
    return [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]


def test_project_params_header(tmp_path):
    size, off_b, off_scale, off_ks, off_sinks = _host_layout(tmp_path)
    p = bytearray(size)
    p[off_b:off_b + 4] = np.int32(2).tobytes()
    p[off_scale:off_scale + 4] = np.float32(0.125).tobytes()
    p[off_ks:off_ks + 32] = np.array([1 << 40, 4096, 64, 1], np.int64).tobytes()
    p[off_sinks:off_sinks + 4] = np.int32(1).tobytes()
    out = np.zeros(10, np.int64)
    kern = msl.compile(K / "params.metal", include_dirs=[REPO / "kernels"])
    res = kern.launch(grid=1, threadgroup=1, buffers=[p, out])
    np.testing.assert_array_equal(out, [size, off_b, off_scale, off_ks, off_sinks, 2, 128, 1 << 40, 1, 1])
    assert res.counters[0].read == 4 + 4 + 8 + 8 + 4 and res.counters[0].written == 0
    with pytest.raises(msl.LaunchError, match="needs .* bytes"):
        kern.launch(grid=1, threadgroup=1, buffers=[bytes(16), out])


def test_atomics(rng):
    x = rng.integers(0, 1000, 16 * 128).astype(np.uint32)
    hist = np.zeros(16, np.uint32)
    total = np.zeros(1, np.float32)
    res = msl.compile(K / "atomics.metal").launch(grid=16, threadgroup=128, buffers=[x, hist, total], race_check=True)
    np.testing.assert_array_equal(hist, np.bincount(x % 16, minlength=16))
    assert total[0] == x.sum()  # exact: every partial sum is an integer below 2**24
    assert res.counters[1].read == res.counters[1].written == 16 * 16 * 4


def test_realistic_launch_is_fast(rng):
    M = N = 256
    Kd = 64
    A = rng.standard_normal((M, Kd)).astype(np.float32)
    B = rng.standard_normal((Kd, N)).astype(np.float32)
    C = np.zeros((M, N), np.float32)
    kern = msl.compile(K / "gemm.metal", name="gemm_float")
    t = time.perf_counter()
    kern.launch(grid=(8, 8), threadgroup=128, buffers=[A, B, C, np.array([M, N, Kd, 0], np.uint32)])
    elapsed = time.perf_counter() - t
    np.testing.assert_allclose(C, A @ B, rtol=1e-4, atol=1e-4)
    assert elapsed < 10, f"64 threadgroups x 128 threads took {elapsed:.1f} s"


# ---------------------------------------------------------------- planted faults

def test_missing_barrier_is_a_race():
    out = np.zeros(128, np.float32)
    kern = msl.compile(K / "faults.metal", name="missing_barrier")
    with pytest.raises(msl.KernelFault, match=r"threadgroup memory race.*missing threadgroup_barrier"):
        kern.launch(grid=1, threadgroup=128, buffers=[out], race_check=True)
    good = msl.compile(K / "faults.metal", name="with_barrier")
    good.launch(grid=1, threadgroup=128, buffers=[out], race_check=True)
    np.testing.assert_array_equal(out, (np.arange(128) + 40) % 128)


def test_early_return_before_barrier_is_divergence():
    out = np.zeros(64, np.float32)
    kern = msl.compile(K / "faults.metal", name="early_return")
    with pytest.raises(msl.KernelFault, match=r"early_return.*threads 32-63 reached it but threads 0-31 had already returned"):
        kern.launch(grid=1, threadgroup=64, buffers=[out])


def test_divergent_barrier_names_threads():
    out = np.zeros(64, np.float32)
    kern = msl.compile(K / "faults.metal", name="divergent_barrier")
    with pytest.raises(msl.KernelFault, match=r"divergent barriers: thread 0 .* at threadgroup_barrier \(.*faults.metal:\d+\) but thread 32"):
        kern.launch(grid=1, threadgroup=64, buffers=[out])


def test_simdgroup_barrier_orders_lanes_of_one_simdgroup():
    out = np.zeros(64, np.float32)
    msl.compile(K / "simd_sync.metal", name="rotate_synced").launch(
        grid=1, threadgroup=64, buffers=[out], race_check=True)
    tid = np.arange(64)
    np.testing.assert_array_equal(out, (tid // 32) * 32 + (tid % 32 + 1) % 32)
    with pytest.raises(msl.KernelFault, match="threadgroup memory race"):
        msl.compile(K / "simd_sync.metal", name="rotate_unsynced").launch(
            grid=1, threadgroup=64, buffers=[out], race_check=True)
    with pytest.raises(msl.KernelFault, match=r"race .* simdgroup 1 .* simdgroup 0|race .* simdgroup 0 .* simdgroup 1"):
        msl.compile(K / "simd_sync.metal", name="cross_simdgroup").launch(
            grid=1, threadgroup=64, buffers=[out], race_check=True)


def test_wild_pointer_and_stack_overflow_are_faults():
    out = np.zeros(32, np.float32)
    with pytest.raises(msl.KernelFault, match=r"wild_pointer.*segmentation fault at address 0x10"):
        msl.compile(K / "faults.metal", name="wild_pointer").launch(grid=1, threadgroup=32, buffers=[out])
    with pytest.raises(msl.KernelFault, match=r"big_stack.*stack overflow"):
        msl.compile(K / "faults.metal", name="big_stack").launch(grid=1, threadgroup=32, buffers=[out])


def test_divergent_simd_collective():
    out = np.zeros(32, np.float32)
    with pytest.raises(msl.KernelFault, match=r"divergent SIMD collective.*lane 0 at simd_sum.*lane 16 at simd_max"):
        msl.compile(K / "faults.metal", name="divergent_simd").launch(grid=1, threadgroup=32, buffers=[out])


def test_out_of_bounds_write_names_buffer():
    out = np.zeros(100, np.float32)
    kern = msl.compile(K / "faults.metal", name="oob_write")
    with pytest.raises(msl.KernelFault, match=r"out-of-bounds device write of 4 bytes at byte offset 400 of buffer 0 'out' \(400 bytes\)"):
        kern.launch(grid=4, threadgroup=32, buffers=[out, u32(100)])


def test_out_of_bounds_constant_read():
    out = np.zeros(32, np.float32)
    table = np.zeros(40, np.float32)
    with pytest.raises(msl.KernelFault, match=r"out-of-bounds constant read .* buffer 1 'table'"):
        msl.compile(K / "faults.metal", name="oob_read").launch(grid=1, threadgroup=32, buffers=[out, table])


def test_threadgroup_memory_limit():
    out = np.zeros(64, np.float32)
    with pytest.raises(msl.KernelFault, match=r"threadgroup memory of 40960 bytes exceeds the 32768-byte limit"):
        msl.compile(K / "faults.metal", name="too_much_tg").launch(grid=1, threadgroup=64, buffers=[out])


def test_threadgroup_memory_is_poisoned():
    out = np.zeros(32, np.uint32)
    msl.compile(K / "faults.metal", name="read_poison").launch(grid=2, threadgroup=32, buffers=[out])
    assert (out == 0xFFFFFFFF).all()


def test_deadlock_lists_waiting_threads():
    out = np.zeros(32, np.float32)
    with pytest.raises(msl.KernelFault, match=r"deadlock.*threads 0-15 wait at simd_sum .*threads 16-31 wait at threadgroup_barrier"):
        msl.compile(K / "faults.metal", name="deadlock").launch(grid=1, threadgroup=32, buffers=[out])


def test_unbound_buffer_is_a_launch_error():
    with pytest.raises(msl.LaunchError, match=r"buffer 1 'n' .* is not bound"):
        msl.compile(K / "faults.metal", name="oob_write").launch(grid=1, threadgroup=1, buffers=[np.zeros(1, np.float32)])


# ---------------------------------------------------------------- rejected sources

@pytest.mark.parametrize("src,pattern", [
    ("uses_double.metal", r"uses_double.metal:4: error: 'double' is not supported"),
    ("unknown_attr.metal", r"unknown attribute \[\[fancy_index\]\]"),
    ("std_include.metal", r"'vector' file not found"),
    ("address_space.metal", r"cannot pass pointer to address space '1' as a pointer to generic address space"),
    ("vector_conversion.metal", r"cannot initialize a variable of type 'float4'.*'int4'"),
    ("recursion.metal", r"recursion is not supported in Metal: fact\(int\) -> fact\(int\)"),
])
def test_rejected_sources(src, pattern):
    with pytest.raises(msl.CompileError, match=pattern):
        msl.compile(K / "bad" / src)
