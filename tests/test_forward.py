"""Forward pass of mlx_flash_attn.attention against the float64 reference."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash_attn as fa
from reference import BF16_DOT_ISAS, DTYPES, assert_close, assert_lse_close, rand, reference

HEAD_DIMS = [32, 64, 80, 96, 128, 256]
# (Lq, Lk): single query, not multiples of the 64-wide blocks, Lq != Lk both ways.
LENGTHS = [(1, 1), (1, 77), (64, 64), (100, 130), (130, 100), (65, 200)]


def run_and_check(rng, dtype, B=2, Hq=4, Hk=2, Lq=70, Lk=90, D=64, Dv=None, **opts):
    Dv = D if Dv is None else Dv
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    out, lse = fa.attention(q, k, v, return_lse=True, **opts)
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Dv)
    assert lse.dtype == mx.float32 and lse.shape == (B, Hq, Lq)
    ref, ref_lse = reference(q, k, v, **opts)
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse)
    return out, lse, ref, ref_lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
def test_shapes(rng, dtype, D, Lq, Lk):
    run_and_check(rng, dtype, B=1, Hq=2, Hk=2, Lq=Lq, Lk=Lk, D=D)


# Decoding with 2 and 4 query heads per K/V head at every head dim: the
# CPU kernel's bfloat16 rows go 2 or 4 at a time (Bf16Dot::group_sums).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("Hq", [4, 8], ids=["gqa2", "gqa4"])
def test_gqa_decode_head_dims(rng, dtype, D, Hq):
    run_and_check(rng, dtype, B=2, Hq=Hq, Hk=2, Lq=1, Lk=150, D=D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", LENGTHS)
def test_causal(rng, dtype, Lq, Lk):
    run_and_check(rng, dtype, Lq=Lq, Lk=Lk, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "window", [(0, 0), (8, 0), (5, 3), (-1, 4), (16, -1), (70, 70), (200, 0)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_window(rng, dtype, window, causal):
    run_and_check(rng, dtype, Lq=150, Lk=170, window_size=window, causal=causal)


# A scale of any sign: at -4 the scores span about +-100, so a softmax
# taking the wrong extreme as its maximum overflows.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [-4.0, -0.1, 0.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(150, 170), (1, 300)])
def test_nonpositive_scale(rng, dtype, scale, causal, Lq, Lk):
    run_and_check(rng, dtype, Lq=Lq, Lk=Lk, scale=scale, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hk", [(8, 8), (8, 2), (8, 1), (6, 3)])
def test_gqa(rng, dtype, Hq, Hk):
    run_and_check(rng, dtype, Hq=Hq, Hk=Hk, causal=True)


# Few K/V heads per call run in waves shared by all threads, many (a few
# per thread: up to 64 here) a whole head per thread (own_heads); 15 heads
# leave a part round.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hk", [(1, 1), (3, 5), (8, 8)])
def test_many_kv_heads(rng, dtype, B, Hk):
    run_and_check(rng, dtype, B=B, Hq=2 * Hk, Hk=Hk, Lq=80, Lk=130, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,Dv", [(64, 32), (32, 128), (192, 128), (80, 256), (128, 7)])
def test_dv_differs(rng, dtype, D, Dv):
    run_and_check(rng, dtype, D=D, Dv=Dv, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap(rng, dtype, softcap):
    # A large scale makes the cap bite.
    run_and_check(rng, dtype, softcap=softcap, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi(rng, dtype, per_batch):
    shape = (2, 4) if per_batch else (4,)
    slopes = mx.array(rng.uniform(0.01, 0.5, shape).astype(np.float32))
    run_and_check(rng, dtype, alibi_slopes=slopes, causal=per_batch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True])
def test_sinks(rng, dtype, per_batch):
    shape = (2, 4) if per_batch else (4,)
    sinks = mx.array(rng.uniform(-2, 3, shape).astype(np.float32))
    run_and_check(rng, dtype, sinks=sinks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(70, 90), (2, 1, 70, 90), (1, 4, 1, 90), (4, 70, 90), (90,)], ids=str
)
def test_bool_mask(rng, dtype, shape):
    mask = mx.array(rng.random(shape) < 0.7)
    run_and_check(rng, dtype, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_dtype", DTYPES, ids=str)
def test_additive_mask(rng, dtype, mask_dtype):
    m = rng.standard_normal((2, 4, 70, 90)).astype(np.float32)
    m[rng.random(m.shape) < 0.2] = -np.inf
    run_and_check(rng, dtype, mask=mx.array(m).astype(mask_dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_string_causal_mask(rng, dtype):
    run_and_check(rng, dtype, Lq=50, Lk=120, mask="causal")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 300), (97, 97), (150, 70)])
def test_everything_combined(rng, dtype, Lq, Lk):
    mask = mx.array(rng.random((2, 1, Lq, Lk)) < 0.8)
    run_and_check(
        rng, dtype, B=2, Hq=6, Hk=2, Lq=Lq, Lk=Lk, D=80, Dv=96, scale=0.3, mask=mask,
        causal=True, window_size=(40, 0), softcap=5.0,
        alibi_slopes=mx.array(rng.uniform(0.0, 0.1, (6,)).astype(np.float32)),
        sinks=mx.array(rng.uniform(-1, 1, (6,)).astype(np.float32)),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_additive_mask_with_window_softcap_alibi(rng, dtype):
    m = mx.array(rng.standard_normal((1, 4, 80, 80)).astype(np.float32))
    run_and_check(
        rng, dtype, Lq=80, Lk=80, mask=m, window_size=(10, 10), softcap=3.0, scale=0.5,
        alibi_slopes=mx.array(rng.uniform(0.0, 0.2, (2, 4)).astype(np.float32)),
    )


@pytest.mark.parametrize("with_sinks", [False, True])
def test_rows_with_no_visible_key(rng, with_sinks):
    """Lq > Lk causal leaves the first rows empty; a mask empties others."""
    mask = np.ones((1, 1, 20, 10), dtype=bool)
    mask[..., 15, :] = False
    sinks = mx.array([0.5, -1.0]) if with_sinks else None
    out, lse, ref, ref_lse = run_and_check(
        rng, mx.float32, B=1, Hq=2, Hk=1, Lq=20, Lk=10, causal=True,
        mask=mx.array(mask), sinks=sinks,
    )
    out, lse = np.array(out), np.array(lse)
    empty = [*range(10), 15]
    assert np.all(out[:, :, empty] == 0.0)
    if with_sinks:
        assert np.all(lse[:, :, empty] == np.array([0.5, -1.0])[None, :, None])
    else:
        assert np.all(np.isneginf(lse[:, :, empty]))
    assert np.all(np.isfinite(out))


def test_fully_masked_additive_rows(rng):
    m = np.zeros((30, 40), dtype=np.float32)
    m[3] = -np.inf
    out, lse, *_ = run_and_check(rng, mx.float16, Lq=30, Lk=40, mask=mx.array(m))
    assert np.all(np.array(out.astype(mx.float32))[:, :, 3] == 0)


def test_empty_keys(rng):
    out, lse, *_ = run_and_check(rng, mx.float32, Lq=5, Lk=0)
    assert np.all(np.array(out) == 0) and np.all(np.isneginf(np.array(lse)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_sequence_many_blocks(rng, dtype):
    run_and_check(rng, dtype, B=1, Hq=2, Hk=1, Lq=700, Lk=1000, D=128, causal=True)


# The CPU kernel gives a task up to 4 blocks of 64 query rows, which share
# each K/V block, and fewer where there would be less than 4 tasks per
# thread: on 2 threads these shapes make 4 blocks a task (the last task
# partial), 2 and 1. Windows give each block its own first and last key.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,Lq", [(4, 2, 700), (1, 2, 500), (1, 1, 700)])
@pytest.mark.parametrize("opts", [
    {}, {"causal": True}, {"window_size": (90, 20)}, {"causal": True, "window_size": (130, -1)}],
    ids=["full", "causal", "window", "causal-window"])
def test_query_blocks_per_task(rng, dtype, B, H, Lq, opts):
    run_and_check(rng, dtype, B=B, Hq=H, Hk=H, Lq=Lq, Lk=Lq + 37, **opts)


# Decoding with fewer tasks than cores (here 1 task: 4 query heads share one
# K/V head): the CPU kernel splits the keys into chunks of >= 4 blocks and
# merges them by LSE. Windows leave whole chunks empty; sinks join the merge.
DECODE_SPLIT_OPTS = {
    "plain": lambda rng: {},
    "window": lambda rng: {"window_size": (300, 0)},
    "last-key": lambda rng: {"window_size": (0, 0)},
    "softcap-alibi-sinks": lambda rng: {
        "softcap": 5.0, "alibi_slopes": mx.array(rng.uniform(0, 0.01, 4).astype(np.float32)),
        "sinks": mx.array(rng.uniform(-2, 3, 4).astype(np.float32))},
    "bool-mask": lambda rng: {"mask": mx.array(rng.random(1500) < 0.5)},
    "masked-out-with-sinks": lambda rng: {
        "mask": mx.zeros((1500,), dtype=mx.bool_), "sinks": mx.array([0.5, -1.0, 2.0, 0.0])},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", DECODE_SPLIT_OPTS, ids=str)
def test_decode_split_keys(rng, dtype, opts):
    run_and_check(rng, dtype, B=1, Hq=4, Hk=1, Lq=1, Lk=1500, D=96, **DECODE_SPLIT_OPTS[opts](rng))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [{}, {"causal": True, "window_size": (2000, 0)}],
                         ids=["full", "window"])
def test_decode_streamed_kv(rng, dtype, opts):
    """Decoding with a long cache (on 2 threads one task per K/V head, its
    keys not split): each task's K and V outgrow the caches, so the CPU
    kernel prefetches them ahead (K a block, V two), up to the last key
    (3001: a partial last block)."""
    run_and_check(rng, dtype, B=1, Hq=8, Hk=4, Lq=1, Lk=3001, D=128, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_keys_converted_in_waves(rng, dtype):
    """One K/V head's float32 copy (9k keys x D 128) fills most of the CPU
    kernel's 16 MiB budget (a bfloat16 pack: more than its 2 MiB), so its 8
    K/V heads are converted a few at a time (one per thread at least), each
    wave's tasks run before the next."""
    run_and_check(rng, dtype, B=2, Hq=8, Hk=4, Lq=100, Lk=9000, D=128, window_size=(-1, 4000))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v_cols", ["strided", "sliced"])
def test_non_contiguous_inputs(rng, dtype, v_cols):
    """mlx-lm's (B, L, H, D) -> (B, H, L, D) transposes, slices, strided D.
    The CPU kernel reads float32 V rows of unit column stride in place
    (sliced), others it copies (strided)."""
    B, L, H, D = 2, 75, 4, 64
    q = rand(rng, (B, L, H, D), dtype).transpose(0, 2, 1, 3)
    kv = rand(rng, (B, 2 * L, 2, 2 * D), dtype)
    k = kv[:, ::2, :, :D].transpose(0, 2, 1, 3)  # strided L, sliced D
    v = kv[:, 1::2, :, ::2] if v_cols == "strided" else kv[:, 1::2, :, D:]
    v = v.transpose(0, 2, 1, 3)
    mask = mx.array(rng.random((L, L)) < 0.8).T  # transposed mask
    for causal in (False, True):
        out = fa.attention(q, k, v, causal=causal, mask=mask)
        ref, _ = reference(q, k, v, causal=causal, mask=mask)
        assert_close(out, ref, dtype)


# Decoding tasks (one query block) take S from dot products with a few
# rows of K at a time: head dims that are not a multiple of 16 leave a
# tail, key counts a partial group. K rows of unit stride are read in
# place (16-bit ones converted in registers), strided ones copied first; V
# rows in place where D is a multiple of 16 (48: three 16-column chunks).
# With 2 or 4 query heads per K/V head, bfloat16 rows go 2 or 4 at a time
# (Bf16Dot::group_sums, in pairs) in chunks of 16 elements: D 1, 7, 20 and
# 100 end in a partial one (3 query rows x 2 heads: a group of 4, then of 2).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [1, 7, 20, 48, 100])
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("Hq", [2, 4, 8], ids=["mha", "gqa2", "gqa4"])
def test_few_rows_odd_head_dims(rng, dtype, D, Lq, strided, Hq):
    B, H, Lk = 2, 2, 77
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, H, Lk, 2 * D if strided else D), dtype)
    k = k[..., ::2] if strided else k
    v = rand(rng, (B, H, Lk, D), dtype)
    for causal in (False, True):
        out = fa.attention(q, k, v, causal=causal)
        ref, _ = reference(q, k, v, causal=causal)
        assert_close(out, ref, dtype)


# A whole query block decoded (2 query heads x 32 rows = 64 rows per task,
# K and V read as they stream by: one task, too few to pack K and V for),
# at a head dim whose V block is smaller than its P block.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_decoding_a_whole_query_block(rng, dtype, causal):
    run_and_check(rng, dtype, B=1, Hq=2, Hk=1, Lq=32, Lk=301, D=16, causal=causal)


# One full query block per head group with D <= 64 and tasks for every
# thread (2 x 16 K/V heads, up to 16 threads): K and V packed as for longer
# queries, not decoded.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Lq", [(16, 64), (64, 16)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("Lk,D", [(64, 64), (301, 32), (150, 48)])
@pytest.mark.parametrize("causal", [False, True])
def test_one_query_block_packed(rng, dtype, Hq, Lq, Lk, D, causal):
    run_and_check(rng, dtype, B=2, Hq=Hq, Hk=16, Lq=Lq, Lk=Lk, D=D, causal=causal)


def test_matches_mlx_fast_sdpa(rng):
    """Drop-in: the same call as mx.fast.scaled_dot_product_attention."""
    q = rand(rng, (1, 8, 33, 64), mx.float32)
    k = rand(rng, (1, 2, 47, 64), mx.float32)
    v = rand(rng, (1, 2, 47, 64), mx.float32)
    masks = [None, "causal", mx.array(rng.random((33, 47)) < 0.5),
             mx.array(rng.standard_normal((1, 8, 33, 47)).astype(np.float32))]
    sinks = mx.array(rng.standard_normal(8).astype(np.float32))
    for mask in masks:
        for s in (None, sinks):
            ours = fa.attention(q, k, v, scale=0.2, mask=mask, sinks=s)
            theirs = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask, sinks=s)
            np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-4, atol=1e-5)


def test_lazy_and_stream(rng):
    q = rand(rng, (1, 2, 16, 32), mx.float32)
    out = fa.attention(q, q, q, stream=mx.cpu)
    assert isinstance(out, mx.array)
    # Nothing ran yet: building the graph twice is cheap and identical.
    out2 = fa.attention(q, q, q, stream=mx.cpu)
    mx.eval(out, out2)
    assert mx.array_equal(out, out2).item()
    ref, _ = reference(q, q, q)
    assert_close(out, ref, mx.float32)


def test_compile(rng):
    q, k, v = (rand(rng, (2, 4, 40, 64), mx.float32) for _ in range(3))

    def f(q, k, v):
        return fa.attention(q, k, v, causal=True) * 2.0 + fa.attention(q, k, v, causal=True)

    out = mx.compile(f)(q, k, v)
    ref, _ = reference(q, k, v, causal=True)
    assert_close(out, 3.0 * ref, mx.float32)


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (1, None, None), (2, 0, None)])
def test_vmap(rng, in_axes):
    N, B, H, L, D = 3, 2, 4, 20, 32
    shapes = {0: (N, B, H, L, D), 1: (B, N, H, L, D), 2: (B, H, N, L, D), None: (B, H, L, D)}
    q, k, v = (rand(rng, shapes[a], mx.float32) for a in in_axes)
    sinks = mx.array(rng.standard_normal(H).astype(np.float32))
    f = mx.vmap(lambda q, k, v: fa.attention(q, k, v, causal=True, sinks=sinks), in_axes=in_axes)
    out = f(q, k, v)
    assert out.shape == (N, B, H, L, D)
    for n in range(N):
        take = lambda x, a: x if a is None else mx.take(x, n, axis=a)
        ref, _ = reference(*(take(x, a) for x, a in zip((q, k, v), in_axes)), causal=True,
                           sinks=sinks)
        assert_close(out[n], ref, mx.float32)


def test_return_types_round_trip(rng):
    q = rand(rng, (1, 1, 3, 32), mx.bfloat16)
    out = fa.attention(q, q, q)
    assert isinstance(out, mx.array) and out.dtype == mx.bfloat16
    out, lse = fa.attention(q, q, q, return_lse=True)
    assert isinstance(lse, mx.array) and lse.dtype == mx.float32
    # Outputs feed back into MLX ops and into the extension again.
    again = fa.attention(out, out, out)
    mx.eval(again + 1)


# The 16-bit dtypes on float32 arithmetic (float16 everywhere, bfloat16 in
# the builds without bfloat16 dot products) compute what the float32
# kernels compute from the exactly widened inputs: their outputs are those
# results rounded to nearest even, all but the rare element that float32
# rounding moves across a tie. A conversion that truncated, or rounded ties
# away, would miss about half of them.
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk,D", [(150, 170, 64), (1, 300, 80)])
def test_16bit_outputs_rounded_to_nearest(rng, dtype, causal, Lq, Lk, D):
    if dtype == mx.bfloat16 and fa.cpu_isa() in BF16_DOT_ISAS:
        pytest.skip("bfloat16 runs on bfloat16 dot products in this build")
    q, k, v = (rand(rng, (1, 4, n, D), dtype) for n in (Lq, Lk, Lk))
    out = fa.attention(q, k, v, causal=causal)
    assert_close(out, reference(q, k, v, causal=causal)[0], dtype)
    out32 = fa.attention(*(x.astype(mx.float32) for x in (q, k, v)), causal=causal)
    same = np.array(out == out32.astype(dtype))
    assert same.mean() > 0.99, f"{same.mean():.3f} of the outputs rounded as float32's"
