"""Packed variable-length sequences, padded batches and dropout."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash_attn as fa
from reference import (BF16_DOT_ISAS, DTYPES, assert_close, assert_grad_close, rand, reference,
                       to64, to_torch, torch_attention)

torch = pytest.importorskip("torch")


def pack(rng, lens, H, D, dtype):
    return rand(rng, (int(sum(lens)), H, D), dtype)


def cu(lens):
    return mx.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))


# Mixed lengths, including empty and single-row sequences, Lq != Lk per sequence.
LENS_Q = [5, 0, 1, 70, 130, 3]
LENS_K = [7, 3, 1, 70, 200, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [
    {}, {"causal": True}, {"window_size": (16, 0)}, {"causal": True, "softcap": 3.0},
    {"window_size": (8, 8), "sinks": "sinks", "alibi_slopes": "alibi"},
], ids=str)
def test_varlen_equals_per_sequence(rng, dtype, opts):
    Hq, Hk, D, Dv = 4, 2, 64, 48
    q = pack(rng, LENS_Q, Hq, D, dtype)
    k = pack(rng, LENS_K, Hk, D, dtype)
    v = pack(rng, LENS_K, Hk, Dv, dtype)
    extra = {}
    if "sinks" in opts:
        extra["sinks"] = mx.array(rng.standard_normal(Hq).astype(np.float32))
        extra["alibi_slopes"] = mx.array(rng.uniform(0, 0.2, Hq).astype(np.float32))
    opts = {n: o for n, o in opts.items() if n not in ("sinks", "alibi_slopes")}
    out, lse = fa.attention_varlen(q, k, v, cu(LENS_Q), cu(LENS_K), max(LENS_Q), max(LENS_K),
                                   return_lse=True, **opts, **extra)
    assert out.shape == (sum(LENS_Q), Hq, Dv) and lse.shape == (Hq, sum(LENS_Q))
    oq = np.concatenate([[0], np.cumsum(LENS_Q)])
    ok = np.concatenate([[0], np.cumsum(LENS_K)])
    for b in range(len(LENS_Q)):
        qs = q[oq[b]:oq[b + 1]].transpose(1, 0, 2)[None]
        ks = k[ok[b]:ok[b + 1]].transpose(1, 0, 2)[None]
        vs = v[ok[b]:ok[b + 1]].transpose(1, 0, 2)[None]
        ref, ref_lse = reference(qs, ks, vs, **opts, **extra)
        assert_close(out[oq[b]:oq[b + 1]].transpose(1, 0, 2)[None], ref, dtype)
        got = to64(lse[:, oq[b]:oq[b + 1]])[None]
        np.testing.assert_allclose(got, ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_varlen_long_keys_in_waves(rng, dtype):
    """Packed sequences share each K/V head; with ~9k keys per head the CPU
    kernel converts (bfloat16: packs) the heads in waves (see
    test_long_keys_converted_in_waves)."""
    lens_q, lens_k = [100, 0, 70, 1], [4000, 30, 5000, 3]
    Hq, Hk, D = 8, 8, 128
    q, k, v = (pack(rng, lens, H, D, dtype) for lens, H in
               ((lens_q, Hq), (lens_k, Hk), (lens_k, Hk)))
    out = fa.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                              causal=True)
    oq, ok = (np.concatenate([[0], np.cumsum(x)]) for x in (lens_q, lens_k))
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        t = lambda x, o: x[o[b]:o[b + 1]].transpose(1, 0, 2)[None]
        ref, _ = reference(t(q, oq), t(k, ok), t(v, ok), causal=True)
        assert_close(out[oq[b]:oq[b + 1]].transpose(1, 0, 2)[None], ref, dtype)


def test_varlen_decode_split_keys(rng):
    """One query per sequence, few tasks: the CPU kernel splits each task's
    keys; a sequence without keys gets zeros and lse = -inf."""
    lens_q, lens_k = [1, 1, 1], [1500, 0, 700]
    q, k, v = (pack(rng, lens, H, 64, mx.float32) for lens, H in
               ((lens_q, 4), (lens_k, 1), (lens_k, 1)))
    out, lse = fa.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), 1, max(lens_k),
                                   return_lse=True)
    ok = np.concatenate([[0], np.cumsum(lens_k)])
    for b in (0, 2):
        ref, ref_lse = reference(q[b:b + 1].transpose(1, 0, 2)[None],
                                 k[ok[b]:ok[b + 1]].transpose(1, 0, 2)[None],
                                 v[ok[b]:ok[b + 1]].transpose(1, 0, 2)[None])
        assert_close(out[b:b + 1].transpose(1, 0, 2)[None], ref, mx.float32)
        np.testing.assert_allclose(to64(lse[:, b]), ref_lse[0, :, 0], rtol=2e-5, atol=2e-5)
    assert np.all(to64(out[1]) == 0) and np.all(np.isneginf(to64(lse[:, 1])))


def test_dropout_decode_split_equals_unsplit(rng):
    """Dropout's mask is a hash of (b, h, i, j): a decode whose keys are split
    (8 query heads on 1 K/V head: one task) equals the same heads with K/V
    repeated (8 tasks: not split)."""
    q = rand(rng, (1, 8, 1, 64), mx.float32)
    k, v = (rand(rng, (1, 1, 2000, 64), mx.float32) for _ in range(2))
    key = mx.random.key(11)
    split = fa.attention(q, k, v, dropout_p=0.3, key=key)
    whole = fa.attention(q, mx.repeat(k, 8, 1), mx.repeat(v, 8, 1), dropout_p=0.3, key=key)
    no_dropout = fa.attention(q, k, v)
    np.testing.assert_allclose(to64(split), to64(whole), rtol=1e-5, atol=1e-6)
    assert np.abs(to64(split) - to64(no_dropout)).max() > 1e-2


def test_varlen_sink_and_alibi_gradients(rng):
    """Sink and ALiBi-slope gradients are sums over each dQ task's partial
    sums. One K/V head of 3 packed sequences takes the CPU backward's
    two-pass path, where the short sequences have no rows in the later
    query blocks: those partial sums must count as 0, whatever memory held
    before (dirtied here with large values), on every call. Reference:
    float64 torch autograd, sequence by sequence."""
    lens_q, lens_k, Hq, D = [130, 5, 70], [140, 9, 80], 2, 32
    q, k, v = pack(rng, lens_q, Hq, D, mx.float32), *(pack(rng, lens_k, 1, D, mx.float32)
                                                     for _ in range(2))
    sinks, slopes = mx.array([0.3, -0.5]), mx.array([0.01, 0.02])

    def packed(s, a):
        return fa.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                   causal=True, sinks=s, alibi_slopes=a).sum()

    tq, tk, tv = (torch.from_numpy(to64(x)) for x in (q, k, v))
    ts, ta = to_torch(sinks), to_torch(slopes)
    oq, ok = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    t = lambda x, o, b: x[o[b]:o[b + 1]].transpose(0, 1)[None]
    sum(torch_attention(t(tq, oq, b), t(tk, ok, b), t(tv, ok, b), causal=True, sinks=ts,
                        alibi_slopes=ta)[0].sum() for b in range(len(lens_q))).backward()

    for _ in range(3):
        mx.eval([mx.full((4096,), 1e30) * 2 for _ in range(50)])
        got = mx.grad(packed, argnums=(0, 1))(sinks, slopes)
        for g, ref in zip(got, (ts.grad.numpy(), ta.grad.numpy())):
            np.testing.assert_allclose(to64(g), ref, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("opts", [{"causal": True}, {"window_size": (24, 8), "softcap": 4.0}],
                         ids=["causal", "window-softcap"])
@pytest.mark.parametrize("Hq,Hk", [(8, 4), (2, 1)], ids=["fused", "two-pass"])
def test_varlen_gradients_against_float64(rng, dtype, D, opts, Hq, Hk):
    """Every gradient of a packed call (q, k, v, sinks, ALiBi slopes) against
    float64 torch autograd, sequence by sequence. The CPU backward fuses its
    two passes where there are two tasks per thread: 4 K/V heads x 3
    sequences are enough up to 6 threads, 1 x 3 too few from 2 threads on.
    The sequences start on odd rows (q and k), where the bfloat16 packs'
    blocks (query blocks aligned to 64 rows, key pairs) reach into the
    neighbouring sequence."""
    lens_q, lens_k = [131, 5, 70], [141, 9, 80]
    q, k, v = (pack(rng, lens, H, D, dtype) for lens, H in
               ((lens_q, Hq), (lens_k, Hk), (lens_k, Hk)))
    w = rand(rng, (sum(lens_q), Hq, D), mx.float32)
    sinks = mx.array(rng.standard_normal(Hq).astype(np.float32))
    slopes = mx.array(rng.uniform(0, 0.1, Hq).astype(np.float32))

    def packed(q, k, v, s, a):
        out = fa.attention_varlen(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                  sinks=s, alibi_slopes=a, **opts)
        return (out.astype(mx.float32) * w).sum()

    got = mx.grad(packed, argnums=(0, 1, 2, 3, 4))(q, k, v, sinks, slopes)
    tq, tk, tv, ts, ta = (to_torch(x) for x in (q, k, v, sinks, slopes))
    tw = torch.from_numpy(to64(w))
    oq, ok = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    t = lambda x, o, b: x[o[b]:o[b + 1]].transpose(0, 1)[None]
    sum((torch_attention(t(tq, oq, b), t(tk, ok, b), t(tv, ok, b), sinks=ts, alibi_slopes=ta,
                         **opts)[0] * t(tw, oq, b)).sum()
        for b in range(len(lens_q))).backward()
    refs = (tq.grad, tk.grad, tv.grad, ts.grad, ta.grad)
    for name, g, ref in zip(("dq", "dk", "dv", "dsinks", "dalibi"), got, refs):
        assert_grad_close(to64(g), ref.numpy(), dtype, name)


@pytest.mark.parametrize("dtype,lens_q,lens_k,Hq,Hk,D", [
    (mx.float32, LENS_Q, LENS_K, 4, 1, 32),
    (mx.bfloat16, LENS_Q, LENS_K, 4, 1, 32),
    # ~9k keys per K/V head at D 128: the CPU backward converts (bfloat16:
    # packs) and runs the 4 K/V heads (shared by all sequences) in waves.
    (mx.float32, [100, 0, 70], [4000, 30, 5000], 8, 4, 128),
    (mx.bfloat16, [100, 0, 70], [4000, 30, 5000], 8, 4, 128),
], ids=["float32", "bfloat16", "float32-waves", "bfloat16-waves"])
def test_varlen_gradients_equal_per_sequence(rng, dtype, lens_q, lens_k, Hq, Hk, D):
    q = pack(rng, lens_q, Hq, D, dtype)
    k = pack(rng, lens_k, Hk, D, dtype)
    v = pack(rng, lens_k, Hk, D, dtype)
    w = rand(rng, (sum(lens_q), Hq, D), mx.float32)
    cq, ck = cu(lens_q), cu(lens_k)

    def packed(q, k, v):
        out = fa.attention_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=True,
                                  window_size=(20, -1))
        return (out * w).sum()

    def split(q, k, v):
        oq = np.concatenate([[0], np.cumsum(lens_q)])
        ok = np.concatenate([[0], np.cumsum(lens_k)])
        total = 0.0
        for b in range(len(lens_q)):
            if lens_q[b] == 0 or lens_k[b] == 0:
                continue  # nothing to differentiate (and MLX's scatter vjp fails on empty slices)
            t = lambda x, o: x[o[b]:o[b + 1]].transpose(1, 0, 2)[None]
            out = fa.attention(t(q, oq), t(k, ok), t(v, ok), causal=True, window_size=(20, -1))
            total = total + (out[0].transpose(1, 0, 2) * w[oq[b]:oq[b + 1]]).sum()
        return total

    g1 = mx.grad(packed, argnums=(0, 1, 2))(q, k, v)
    g2 = mx.grad(split, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g1, g2):
        if dtype == mx.bfloat16 and fa.cpu_isa() in BF16_DOT_ISAS:
            # bfloat16 dot products round P to bfloat16 per key block, and
            # packed sequences start their blocks elsewhere: equal up to
            # that rounding.
            a, b = to64(a), to64(b)
            assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
        else:
            # Same kernel, same blocks per sequence: equal up to summation
            # order, which can flip the final rounding to bfloat16 (1 ulp).
            rtol = 2.0**-7 if dtype == mx.bfloat16 else 1e-5
            np.testing.assert_allclose(to64(a), to64(b), rtol=rtol, atol=1e-5)


VARLEN_ERRORS = [
    (dict(cu_seqlens_q=mx.array([0, 5, 3, 10], dtype=mx.int32)), r"cu_seqlens_q must be non-decreasing"),
    (dict(cu_seqlens_q=mx.array([0, 5, 7, 10], dtype=mx.int64)), r"cu_seqlens_q must be an int32 array of shape \(B \+ 1,\)"),
    (dict(cu_seqlens_k=mx.array([0, 5, 12], dtype=mx.int32)), r"cu_seqlens_k must be an int32 array of shape \(B \+ 1,\) = \(4,\)"),
    (dict(cu_seqlens_k=mx.array([0, 5, 7, 13], dtype=mx.int32)), r"cu_seqlens_k must end at the number of rows of k \(12\); got 13"),
    (dict(cu_seqlens_q=mx.array([1, 5, 7, 10], dtype=mx.int32)), r"cu_seqlens_q must start at 0"),
    (dict(max_seqlen_q=2), r"max_seqlen_q \(2\) is shorter than the longest sequence \(5\)"),
    (dict(q=mx.zeros((1, 10, 4, 32))), r"q must be 3-D \(total_q, Hq, D\)"),
    (dict(k=mx.zeros((12, 3, 32)), v=mx.zeros((12, 3, 32))), r"multiple of the number of key/value heads"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("override,message", VARLEN_ERRORS, ids=[m for _, m in VARLEN_ERRORS])
def test_varlen_errors(override, message):
    args = dict(q=mx.zeros((10, 4, 32)), k=mx.zeros((12, 2, 32)), v=mx.zeros((12, 2, 32)),
                cu_seqlens_q=mx.array([0, 5, 7, 10], dtype=mx.int32),
                cu_seqlens_k=mx.array([0, 5, 7, 12], dtype=mx.int32),
                max_seqlen_q=5, max_seqlen_k=5)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        mx.eval(fa.attention_varlen(**args))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_lengths(rng, dtype, side, causal):
    B, Hq, Hk, Lq, Lk, D = 4, 4, 2, 40, 60, 64
    ql, kl = [40, 1, 25, 0], [60, 10, 33, 5]
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, D), dtype)
    out = fa.attention(q, k, v, causal=causal, padding_side=side,
                       q_lengths=mx.array(ql), kv_lengths=mx.array(kl))
    out64 = to64(out)
    for b in range(B):
        qs = slice(0, ql[b]) if side == "right" else slice(Lq - ql[b], Lq)
        ks = slice(0, kl[b]) if side == "right" else slice(Lk - kl[b], Lk)
        ref, _ = reference(q[b:b + 1, :, qs], k[b:b + 1, :, ks], v[b:b + 1, :, ks], causal=causal)
        assert_close(out[b:b + 1, :, qs], ref, dtype)
        pad = np.ones(Lq, dtype=bool)
        pad[qs] = False
        assert np.all(out64[b, :, pad] == 0), "padding rows must be zero"


def test_padded_batch_gradients_and_mask_equivalence(rng):
    """kv_lengths == the same padding as a boolean mask, forward and backward."""
    B, H, L, D = 3, 2, 50, 32
    kl = mx.array([50, 17, 3])
    mask = (mx.arange(L)[None, :] < kl[:, None])[:, None, None, :]
    q, k, v = (rand(rng, (B, H, L, D), mx.float32) for _ in range(3))
    f1 = lambda q, k, v: (fa.attention(q, k, v, kv_lengths=kl) ** 2).sum()
    f2 = lambda q, k, v: (fa.attention(q, k, v, mask=mask) ** 2).sum()
    for a, b in zip(mx.grad(f1, argnums=(0, 1, 2))(q, k, v), mx.grad(f2, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_padded_batch_errors():
    q = mx.zeros((2, 2, 8, 32))
    with pytest.raises(ValueError, match=r"kv_lengths must have shape \(B,\) = \(2,\)"):
        fa.attention(q, q, q, kv_lengths=mx.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"q_lengths must be an integer array"):
        fa.attention(q, q, q, q_lengths=mx.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"padding_side must be \"right\" or \"left\""):
        fa.attention(q, q, q, kv_lengths=mx.array([1, 2]), padding_side="top")


# --- dropout -----------------------------------------------------------------

def dropout_mask(B, Hq, Lq, Lk, p, key):
    """The kernel's keep mask, read back through V = identity: out = P z / l."""
    q = mx.zeros((B, Hq, Lq, 16))  # uniform P = 1 / Lk
    v = mx.broadcast_to(mx.eye(Lk), (B, 1, Lk, Lk))
    out = to64(fa.attention(q, q[:, :1, :Lk] if Lq == Lk else mx.zeros((B, 1, Lk, 16)), v,
                            dropout_p=p, key=key))
    kept = np.isclose(out, 1.0 / Lk / (1 - p), rtol=1e-5)
    assert np.all(kept | (out == 0)), "dropout scales kept probabilities by 1 / (1 - p)"
    return kept


def test_dropout_mask_rate_and_scaling():
    kept = dropout_mask(2, 4, 64, 96, 0.3, mx.random.key(1))
    assert abs(kept.mean() - 0.7) < 0.01


def test_dropout_same_key_same_result_different_keys_differ(rng):
    q, k, v = (rand(rng, (2, 4, 70, 64), mx.bfloat16) for _ in range(3))
    a = fa.attention(q, k, v, dropout_p=0.2, key=mx.random.key(5), causal=True)
    b = fa.attention(q, k, v, dropout_p=0.2, key=mx.random.key(5), causal=True)
    c = fa.attention(q, k, v, dropout_p=0.2, key=mx.random.key(6), causal=True)
    assert mx.array_equal(a, b).item() and not mx.array_equal(a, c).item()
    # Without a key: MLX's global random state, so seeding reproduces it.
    mx.random.seed(11)
    d = fa.attention(q, k, v, dropout_p=0.2)
    mx.random.seed(11)
    e = fa.attention(q, k, v, dropout_p=0.2)
    assert mx.array_equal(d, e).item()


def test_dropout_mean_converges_to_no_dropout(rng):
    q, k, v = (rand(rng, (1, 2, 20, 32), mx.float32) for _ in range(3))
    n = 400
    keys = mx.random.split(mx.random.key(0), n)
    samples = np.stack([to64(fa.attention(q, k, v, dropout_p=0.5, key=keys[i])) for i in range(n)])
    ref, _ = reference(q, k, v)
    # Unbiased: the mean is within 5 standard errors of the no-dropout output.
    stderr = samples.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(samples.mean(axis=0) - ref) <= 5 * stderr + 1e-6)
    assert np.all(samples.std(axis=0) > 0)


@pytest.mark.parametrize("opts", [{}, {"causal": True, "window_size": (30, 0)},
                                  {"sinks": True, "softcap": 2.0}], ids=str)
# One K/V head: the CPU backward's two passes; 2 x 8: its fused per-head tasks.
@pytest.mark.parametrize("B,Hq,Hk", [(1, 2, 1), (2, 8, 8)], ids=str)
def test_dropout_gradients(rng, opts, B, Hq, Hk):
    """Gradients with a fixed key equal float64 autograd through the same mask."""
    Lq, Lk, D, p = 40, 56, 32, 0.25
    key = mx.random.key(7)
    z = dropout_mask(B, Hq, Lq, Lk, p, key)
    opts = dict(opts)
    if opts.pop("sinks", False):
        opts["sinks"] = mx.array(rng.standard_normal(Hq).astype(np.float32))
    q = rand(rng, (B, Hq, Lq, D), mx.float32)
    k = rand(rng, (B, Hk, Lk, D), mx.float32)
    v = rand(rng, (B, Hk, Lk, D), mx.float32)
    w = rand(rng, (B, Hq, Lq, D), mx.float32)
    g = mx.grad(lambda q, k, v: (fa.attention(q, k, v, dropout_p=p, key=key, **opts) * w).sum(),
                argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (to_torch(x) for x in (q, k, v))
    topts = {n: to_torch(x) if isinstance(x, mx.array) else x for n, x in opts.items()}
    # Recompute the no-dropout P from the reference, then drop with z.
    ones = torch.eye(Lk, dtype=torch.float64).expand(B, Hk, Lk, Lk)
    P, _ = torch_attention(tq, tk, ones, **topts)
    out = (P * torch.from_numpy(z) / (1 - p)) @ tv.repeat_interleave(Hq // Hk, 1)
    (out * torch.from_numpy(to64(w))).sum().backward()
    for a, t in zip(g, (tq, tk, tv)):
        ref = t.grad.numpy()
        assert np.abs(to64(a) - ref).max() / np.abs(ref).max() < 2e-5


def test_dropout_deterministic_gradients(rng):
    q, k, v = (rand(rng, (2, 4, 130, 64), mx.float32) for _ in range(3))
    f = mx.grad(lambda q, k, v: fa.attention(q, k, v, dropout_p=0.1, key=mx.random.key(3)).sum(),
                argnums=(0, 1, 2))
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(a, b):
        assert mx.array_equal(x, y).item()
