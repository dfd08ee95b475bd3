"""The Metal kernels (kernels/*.metal) under the emulator, against the float64
reference with the CPU tests' tolerances. Every launch follows the plan of
cpp/metal/dispatch.cpp, so the dispatcher's choices are what is tested."""
import math

import mlx.core as mx
import numpy as np
import pytest

import flash_metal as fm
import msl
from reference import DTYPES, TOL, assert_close, assert_lse_close, rand, reference

pytestmark = [
    pytest.mark.metal,
    pytest.mark.skipif(msl.clang() is None, reason="clang++-19 is not installed (apt-get install -y clang-19)"),
]

FC = dict(MASK_BOOL=0, MASK_ADD=1, WINDOW=2, SOFTCAP=3, ALIBI=4, SINKS=5, SEQS=6, DROPOUT=7, SPLIT=8)
BUF = dict(Q=0, K=1, V=2, OUT=9, LSE=10)


def check(rng, dtype=mx.float32, B=1, Hq=2, Hk=None, Lq=37, Lk=45, D=64, Dv=None,
          min_split_keys=None, race_check=False, **opts):
    """Runs the Metal forward on fresh inputs and compares with the reference."""
    Hk = Hq if Hk is None else Hk
    Dv = D if Dv is None else Dv
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    out, lse, run = fm.attention(q, k, v, min_split_keys=min_split_keys, race_check=race_check,
                                 **opts)
    ref_out, ref_lse = reference(q, k, v, **opts)
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype)
    assert_lse_close(lse, ref_lse)
    return run


def launched(run):
    return [l["kernel"] for l in run.plan["launches"]]


# ---------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 192, 256])
def test_head_dims(rng, dtype, D):
    """Every instantiated (dtype, head dim) kernel, with Lq and Lk not
    multiples of the tiles; the emulator also enforces <= 32 KB of
    threadgroup memory for each."""
    run = check(rng, dtype, Lq=35, Lk=41, D=D)
    assert launched(run) == [f"flash_fwd_{ {mx.float32: 'float', mx.float16: 'half', mx.bfloat16: 'bfloat'}[dtype]}_{D}"]


@pytest.mark.parametrize("D", [1, 24, 40, 72, 100, 160, 250])
def test_odd_head_dims_use_the_next_kernel(rng, D):
    check(rng, mx.float16, Lq=9, Lk=20, D=D)


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 77), (33, 1), (64, 64), (100, 30), (31, 129)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(rng, Lq, Lk, causal):
    check(rng, mx.float32, Lq=Lq, Lk=Lk, causal=causal)


@pytest.mark.parametrize("Hq,Hk", [(4, 2), (6, 2), (8, 1), (3, 3)])
def test_gqa(rng, Hq, Hk):
    run = check(rng, mx.float16, B=2, Hq=Hq, Hk=Hk, Lq=20, Lk=33)
    # Query heads that share a K/V head are stacked into one block.
    assert run.plan["launches"][0]["grid"][1] == Hk


@pytest.mark.parametrize("D,Dv", [(64, 32), (32, 128), (80, 64)])
def test_dv_differs(rng, D, Dv):
    check(rng, mx.bfloat16, D=D, Dv=Dv)


def test_strided_inputs(rng):
    """Arbitrary strides: q, k, v are (B, L, H, D) buffers seen as (B, H, L, D)."""
    q = rand(rng, (2, 21, 4, 64), mx.float16).transpose(0, 2, 1, 3)
    k = rand(rng, (2, 30, 2, 64), mx.float16).transpose(0, 2, 1, 3)
    v = rand(rng, (2, 64, 30, 2), mx.float16).transpose(0, 3, 2, 1)  # D strided too
    out, lse, run = fm.attention(q, k, v, causal=True)
    ref_out, ref_lse = reference(q, k, v, causal=True)
    assert_close(out, ref_out, mx.float16)
    assert_lse_close(lse, ref_lse)


# ---------------------------------------------------------------- options

OPTIONS = {
    "causal": lambda rng, B, H, Lq, Lk: dict(causal=True),
    "window": lambda rng, B, H, Lq, Lk: dict(window_size=(7, 3)),
    "window_left": lambda rng, B, H, Lq, Lk: dict(window_size=(5, -1), causal=True),
    "softcap": lambda rng, B, H, Lq, Lk: dict(softcap=1.5),
    "alibi": lambda rng, B, H, Lq, Lk: dict(alibi_slopes=mx.array(rng.uniform(0.05, 0.5, (B, H)).astype(np.float32))),
    "sinks": lambda rng, B, H, Lq, Lk: dict(sinks=mx.array(rng.standard_normal(H).astype(np.float32))),
    "bool_mask": lambda rng, B, H, Lq, Lk: dict(mask=mx.array(rng.random((B, 1, Lq, Lk)) < 0.7)),
    "additive_mask": lambda rng, B, H, Lq, Lk: dict(mask=mx.array(rng.standard_normal((Lq, Lk)).astype(np.float32))),
    "scale": lambda rng, B, H, Lq, Lk: dict(scale=0.3),
    "negative_scale": lambda rng, B, H, Lq, Lk: dict(scale=-4.0, causal=True),
}
FC_OF = {"causal": "WINDOW", "negative_scale": "WINDOW", "window": "WINDOW",
         "window_left": "WINDOW", "softcap": "SOFTCAP", "alibi": "ALIBI", "sinks": "SINKS",
         "bool_mask": "MASK_BOOL", "additive_mask": "MASK_ADD"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option(rng, dtype, option):
    B, H, Lq, Lk = 2, 2, 29, 43
    run = check(rng, dtype, B=B, Hq=H, Lq=Lq, Lk=Lk, D=64, **OPTIONS[option](rng, B, H, Lq, Lk))
    on = {n for n, i in FC.items() if run.plan["launches"][0]["constants"][i]}
    assert on == ({FC_OF[option]} if option in FC_OF else set())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(37, 70), (70, 37), (1, 90)])
def test_everything_combined(rng, dtype, Lq, Lk):
    B, Hq, Hk = 2, 4, 2
    opts = {}
    for name in ("causal", "softcap", "alibi", "sinks", "additive_mask"):
        opts.update(OPTIONS[name](rng, B, Hq, Lq, Lk))
    opts["window_size"] = (20, -1)
    check(rng, dtype, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=80, **opts)


def test_fully_masked_rows(rng):
    """Rows that see no key: zeros and lse = -inf (or the sink)."""
    mask = mx.array(np.tile(np.arange(24)[:, None] % 3 != 0, (1, 40)))
    check(rng, mx.float32, Lq=24, Lk=40, mask=mask)
    check(rng, mx.float32, Lq=24, Lk=40, mask=mask,
          sinks=mx.array(np.array([0.5, -1.0], np.float32)))


def test_no_threadgroup_memory_races(rng):
    check(rng, mx.float16, Hq=2, Lq=33, Lk=50, D=64, causal=True, race_check=True)
    check(rng, mx.float32, Hq=4, Hk=2, Lq=1, Lk=300, D=64, min_split_keys=64, race_check=True)


# ---------------------------------------------------------------- decode (split keys)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", ["none", "causal", "window", "alibi", "sinks", "bool_mask", "softcap"])
def test_decode_split_matches_reference(rng, dtype, option):
    B, Hq, Hk, Lq, Lk = 1, 8, 2, 1, 700
    opts = {} if option == "none" else OPTIONS[option](rng, B, Hq, Lq, Lk)
    if option == "window":
        opts = dict(window_size=(300, 0))
    run = check(rng, dtype, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=64, min_split_keys=128, **opts)
    kernels = launched(run)
    assert len(kernels) == 2 and kernels[1].startswith("flash_fwd_combine")
    p = run.plan["launches"][0]
    assert p["constants"][FC["SPLIT"]] and p["grid"][0] > 1


def test_decode_split_matches_prefill(rng):
    """The split kernels and the single-pass kernel agree (same inputs)."""
    q = rand(rng, (2, 4, 3, 128), mx.bfloat16)
    k = rand(rng, (2, 1, 500, 128), mx.bfloat16)
    v = rand(rng, (2, 1, 500, 128), mx.bfloat16)
    o1, l1, r1 = fm.attention(q, k, v, causal=True, min_split_keys=100)
    o2, l2, r2 = fm.attention(q, k, v, causal=True)
    assert len(r1.plan["launches"]) == 2 and len(r2.plan["launches"]) == 1
    a, b = np.array(o1.astype(mx.float32)), np.array(o2.astype(mx.float32))
    assert np.abs(a - b).max() <= TOL[mx.bfloat16] * np.abs(b).max()
    np.testing.assert_allclose(np.array(l1), np.array(l2), rtol=1e-5)


def test_decode_split_is_chosen_for_long_keys(rng):
    """The default tuning splits a decoding step over long keys, and not a prefill."""
    q = rand(rng, (1, 8, 1, 64), mx.float16)
    k = rand(rng, (1, 2, 2048, 64), mx.float16)
    out, _ = fm.fa.attention(q, k, k, return_lse=True, stream=mx.cpu)
    plan = fm._ext._metal_plan(out, None)
    assert [l["kernel"] for l in plan["launches"]] == ["flash_fwd_half_64", "flash_fwd_combine_half"]
    q = rand(rng, (4, 32, 2048, 64), mx.float16)
    out, _ = fm.fa.attention(q, q, q, return_lse=True, stream=mx.cpu)
    assert len(fm._ext._metal_plan(out, None)["launches"]) == 1


# ---------------------------------------------------------------- sequences and dropout

def test_padded_lengths(rng):
    B, H, Lq, Lk = 3, 2, 20, 31
    q = rand(rng, (B, H, Lq, 64), mx.float16)
    k = rand(rng, (B, H, Lk, 64), mx.float16)
    v = rand(rng, (B, H, Lk, 64), mx.float16)
    ql, kl = [20, 7, 0], [31, 12, 5]
    for side in ("right", "left"):
        opts = dict(q_lengths=mx.array(ql), kv_lengths=mx.array(kl), padding_side=side, causal=True)
        out, lse, _ = fm.attention(q, k, v, **opts)
        cpu_out, cpu_lse = fm.fa.attention(q, k, v, return_lse=True, stream=mx.cpu, **opts)
        for b in range(B):  # each entry against the reference on its own rows
            qs = slice(0, ql[b]) if side == "right" else slice(Lq - ql[b], Lq)
            ks = slice(0, kl[b]) if side == "right" else slice(Lk - kl[b], Lk)
            if ql[b] == 0:
                continue
            ro, rl = reference(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks], causal=True)
            assert_close(out[b:b + 1, :, qs], ro, mx.float16)
            assert_lse_close(lse[b:b + 1, :, qs], rl)
        # Padding rows: as the CPU kernel (zeros, lse -inf).
        np.testing.assert_array_equal(np.array(mx.isneginf(lse)), np.array(mx.isneginf(cpu_lse)))
        assert np.all(np.isfinite(np.array(out.astype(mx.float32))))


def test_varlen(rng):
    seqlens = fm.SEQLENS
    cu, q, k, v = fm.varlen_inputs(rng, mx.bfloat16)
    out, lse = fm.fa.attention_varlen(q, k, v, cu, cu, max(seqlens), max(seqlens), causal=True,
                                      return_lse=True, stream=mx.cpu)
    run = fm.run_plan(out)
    mo, ml = run.outputs  # the primitive's (1, H, total, Dv) and (1, H, total) layout
    for b, n in enumerate(seqlens):
        s = slice(int(cu[b]), int(cu[b]) + n)
        qs = q[s].transpose(1, 0, 2)[None]
        ks, vs = k[s].transpose(1, 0, 2)[None], v[s].transpose(1, 0, 2)[None]
        ro, rl = reference(qs, ks, vs, causal=True)
        assert_close(mo[:, :, s], ro, mx.bfloat16)
        assert_lse_close(ml[:, :, s], rl)


def test_dropout_matches_cpu_kernel(rng):
    """Dropout draws from the same counter hash on both backends, so the
    Metal result equals the CPU kernel's (itself checked in test_varlen_dropout.py)."""
    q = rand(rng, (2, 2, 19, 64), mx.float32)
    k = rand(rng, (2, 2, 33, 64), mx.float32)
    key = mx.random.key(7)
    out, lse, _ = fm.attention(q, k, k, dropout_p=0.3, key=key, causal=True)
    cpu = fm.fa.attention(q, k, k, dropout_p=0.3, key=key, causal=True, stream=mx.cpu)
    np.testing.assert_allclose(np.array(out), np.array(cpu), rtol=2e-5, atol=2e-5)
    ref_out, _ = reference(q, k, k, causal=True)
    assert np.abs(np.array(out) - ref_out).max() > 1e-2  # dropout did something


# ---------------------------------------------------------------- memory traffic

@pytest.mark.parametrize("Hq,Hk", [(2, 2), (4, 1)])
def test_memory_traffic(rng, Hq, Hk):
    """Q is read once, O and LSE written once, K and V read once per block
    of query rows that shares them: ceil(Lq / rows per head) times per K/V
    head, i.e. ceil(Lq / BQ) times per query head without GQA."""
    B, Lq, Lk, D = 1, 70, 50, 64
    run = check(rng, mx.float16, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=D)
    c = lambda slot: run.counters(0, slot)
    rows = 32 // (Hq // Hk)  # FA_BLOCK_Q rows, shared by the stacked heads
    assert c(BUF["Q"]).read == B * Hq * Lq * D * 2
    assert c(BUF["OUT"]).written == B * Hq * Lq * D * 2 and c(BUF["OUT"]).read == 0
    assert c(BUF["LSE"]).written == B * Hq * Lq * 4
    kv = B * Hk * Lk * D * 2
    assert c(BUF["K"]).read == kv * math.ceil(Lq / rows)
    assert c(BUF["V"]).read == kv * math.ceil(Lq / rows)
    if Hq == Hk:
        assert c(BUF["K"]).read == kv * math.ceil(Lq / 32)


def test_memory_traffic_causal_skips_blocks(rng):
    """Causal: each query block reads only the key tiles up to its diagonal."""
    Lq = Lk = 96
    run = check(rng, mx.float16, B=1, Hq=1, Lq=Lq, Lk=Lk, D=64, causal=True)
    row_bytes = 64 * 2
    # Query blocks [0,32), [32,64), [64,96) see 32, 64 and 96 keys.
    assert run.counters(0, BUF["K"]).read == (32 + 64 + 96) * row_bytes
    run = check(rng, mx.float16, B=1, Hq=1, Lq=Lq, Lk=Lk, D=64, window_size=(10, 0))
    assert run.counters(0, BUF["K"]).read == (32 + 42 + 42) * row_bytes
