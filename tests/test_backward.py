"""Gradients of mlx_flash_attn.attention against float64 PyTorch autograd."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

import mlx_flash_attn as fa
from reference import BF16_DOT_ISAS, DTYPES, assert_grad_close, rand, reference_grads, to64

torch = pytest.importorskip("torch")


def grad_check(rng, dtype, B=2, Hq=4, Hk=2, Lq=70, Lk=90, D=64, Dv=None, use_lse=True,
               **opts):
    """Compares d(loss)/d(every differentiable input) with float64 torch, where
    loss = sum(out * dO) + sum(lse * dLSE)."""
    Dv = D if Dv is None else Dv
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    dout = rand(rng, (B, Hq, Lq, Dv), mx.float32)
    dlse = rand(rng, (B, Hq, Lq), mx.float32) if use_lse else mx.zeros((B, Hq, Lq))

    names = ["q", "k", "v"]
    args = [q, k, v]
    for name in ("mask", "alibi_slopes", "sinks"):
        x = opts.pop(name, None)
        if x is not None and not (isinstance(x, mx.array) and x.dtype == mx.bool_):
            names.append(name)
            args.append(x)
        elif x is not None:
            opts[name] = x  # boolean masks are not differentiable

    def loss(*xs):
        kw = dict(zip(names[3:], xs[3:]))
        out, lse = fa.attention(*xs[:3], return_lse=True, **kw, **opts)
        return (out.astype(mx.float32) * dout).sum() + (
            mx.where(mx.isinf(lse), 0.0, lse) * dlse).sum()

    grads = mx.grad(loss, argnums=tuple(range(len(args))))(*args)

    ref = reference_grads(*args[:3], dout, dlse, **dict(zip(names[3:], args[3:])), **opts)
    for name, g, x in zip(names, grads, args):
        assert g.shape == x.shape, f"d{name} shape"
        assert g.dtype == x.dtype, f"d{name} dtype"
        assert_grad_close(to64(g), ref[name], dtype, f"d{name}")
    return grads


# As in the forward's test_many_kv_heads: the copies in waves or per thread.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hk", [(1, 1), (3, 5), (8, 8)])
def test_many_kv_heads(rng, dtype, B, Hk):
    grad_check(rng, dtype, B=B, Hq=2 * Hk, Hk=Hk, Lq=80, Lk=130, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 256])
def test_head_dims(rng, dtype, D):
    grad_check(rng, dtype, B=1, Hq=2, Hk=1, Lq=67, Lk=67, D=D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 100), (64, 64), (100, 130), (130, 100), (200, 65)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(rng, dtype, Lq, Lk, causal):
    grad_check(rng, dtype, Lq=Lq, Lk=Lk, causal=causal)


# A scale of any sign (at -4 the scores span about +-100).
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [-4.0, 0.0])
@pytest.mark.parametrize("causal", [False, True])
def test_nonpositive_scale(rng, dtype, scale, causal):
    grad_check(rng, dtype, Lq=150, Lk=170, scale=scale, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [(0, 0), (8, 0), (5, 3), (-1, 4), (16, -1)])
def test_window(rng, dtype, window):
    grad_check(rng, dtype, Lq=150, Lk=170, window_size=window)


# One (batch, K/V head) takes the CPU backward's two-pass path (dQ tasks
# apart from dK/dV tasks), whose dQ tasks start at the block holding their
# first visible key: windows put that key mid-block.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [(8, 0), (5, 3), (16, -1)])
def test_window_two_pass(rng, dtype, window):
    grad_check(rng, dtype, B=1, Hq=2, Hk=1, Lq=150, Lk=170, window_size=window)


# The two-pass path's dQ task takes up to 4 blocks of 64 query rows, which
# share each key block, and fewer where there would be less than 4 tasks per
# thread: on 2 threads these shapes (one K/V head) make 4 blocks a task (the
# last task partial), 2 and 1. Windows give each block its own first and
# last key; "all" adds every score modifier and the gradients they have.
TWO_PASS_OPTS = {
    "full": lambda rng, H, Lq: {},
    "causal": lambda rng, H, Lq: {"causal": True},
    "window": lambda rng, H, Lq: {"window_size": (90, 20)},
    "causal-window": lambda rng, H, Lq: {"causal": True, "window_size": (130, -1)},
    "all": lambda rng, H, Lq: {
        "window_size": (200, 70), "softcap": 5.0,
        "mask": mx.array(rng.standard_normal((Lq, Lq + 37)).astype(np.float32)),
        "alibi_slopes": mx.array(rng.uniform(0.0, 0.05, (H,)).astype(np.float32)),
        "sinks": mx.array(rng.uniform(-1, 1, (H,)).astype(np.float32))},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("H,Lq", [(4, 700), (2, 500), (1, 300)])
@pytest.mark.parametrize("opts", TWO_PASS_OPTS, ids=str)
def test_two_pass_query_blocks_per_task(rng, dtype, H, Lq, opts):
    grad_check(rng, dtype, B=1, Hq=H, Hk=1, Lq=Lq, Lk=Lq + 37, **TWO_PASS_OPTS[opts](rng, H, Lq))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hk", [(8, 2), (8, 1), (6, 3)])
def test_gqa(rng, dtype, Hq, Hk):
    grad_check(rng, dtype, Hq=Hq, Hk=Hk, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_keys_converted_in_waves(rng, dtype):
    """One K/V head's float32 operands (9k keys x D 128) fill most of the CPU
    kernel's 16 MiB budget (bfloat16 packs: more than their 2 MiB): the 8
    K/V heads and their query heads are converted and differentiated a few
    at a time."""
    grad_check(rng, dtype, B=2, Hq=8, Hk=4, Lq=70, Lk=9000, D=128, window_size=(-1, 4000))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,Dv", [(64, 32), (32, 128), (192, 128)])
def test_dv_differs(rng, dtype, D, Dv):
    grad_check(rng, dtype, D=D, Dv=Dv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softcap(rng, dtype):
    grad_check(rng, dtype, softcap=2.0, scale=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alibi(rng, dtype):
    grad_check(rng, dtype, alibi_slopes=mx.array(rng.uniform(0.01, 0.3, (4,)).astype(np.float32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sinks(rng, dtype):
    grad_check(rng, dtype, sinks=mx.array(rng.uniform(-1, 2, (2, 4)).astype(np.float32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bool_mask(rng, dtype):
    grad_check(rng, dtype, mask=mx.array(rng.random((2, 1, 70, 90)) < 0.7))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 90), (2, 4, 70, 90), (1, 4, 1, 90)], ids=str)
def test_additive_mask(rng, dtype, shape):
    grad_check(rng, dtype, mask=mx.array(rng.standard_normal(shape).astype(np.float32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 200), (97, 97), (150, 70)])
def test_everything_combined(rng, dtype, Lq, Lk):
    grad_check(
        rng, dtype, Hq=6, Hk=2, Lq=Lq, Lk=Lk, D=80, Dv=96, scale=0.3, causal=True,
        window_size=(40, 0), softcap=5.0,
        mask=mx.array(rng.standard_normal((Lq, Lk)).astype(np.float32)),
        alibi_slopes=mx.array(rng.uniform(0.0, 0.1, (6,)).astype(np.float32)),
        sinks=mx.array(rng.uniform(-1, 1, (6,)).astype(np.float32)),
    )


def test_empty_batch(rng):
    """No batch entries: empty outputs and gradients, no crash."""
    q = rand(rng, (0, 4, 70, 64), mx.float32)
    out = fa.attention(q, q, q)
    grads = mx.grad(lambda q, k, v: fa.attention(q, k, v).sum(), argnums=(0, 1, 2))(q, q, q)
    assert out.shape == q.shape and all(g.shape == q.shape for g in grads)


def test_fully_masked_rows_get_zero_gradient(rng):
    """Lq > Lk causal: the first Lq - Lk queries see nothing."""
    q, k, v = (rand(rng, (1, 2, 20 if i == 0 else 10, 32), mx.float32) for i in range(3))
    gq, gk, gv = mx.grad(lambda q, k, v: fa.attention(q, k, v, causal=True).sum(),
                         argnums=(0, 1, 2))(q, k, v)
    gq = np.array(gq)
    assert np.all(gq[:, :, :10] == 0) and np.all(np.isfinite(gq))
    assert np.all(np.isfinite(np.array(gk))) and np.all(np.isfinite(np.array(gv)))
    grad_check(rng, mx.float32, B=1, Hq=2, Hk=1, Lq=20, Lk=10, causal=True)


def test_deterministic(rng):
    q, k, v = (rand(rng, (2, 8, 300, 64), mx.bfloat16) for _ in range(3))
    f = mx.grad(lambda q, k, v: (fa.attention(q, k, v, causal=True) ** 2).sum(), argnums=(0, 1, 2))
    first = [np.array(g.astype(mx.float32)) for g in f(q, k, v)]
    for _ in range(3):
        again = [np.array(g.astype(mx.float32)) for g in f(q, k, v)]
        for a, b in zip(first, again):
            assert np.array_equal(a, b)


def test_value_and_grad_vjp_and_vmap(rng):
    q, k, v = (rand(rng, (2, 2, 30, 32), mx.float32) for _ in range(3))
    f = lambda q: fa.attention(q, k, v, causal=True).sum()
    val, g = mx.value_and_grad(f)(q)
    (out,), (gv,) = mx.vjp(lambda q: fa.attention(q, k, v, causal=True), [q], [mx.ones_like(q)])
    assert np.allclose(np.array(g), np.array(gv))
    assert np.isclose(val.item(), out.sum().item(), rtol=1e-5)
    # Per-example gradients: vmap over a leading axis of grad.
    qs = rand(rng, (3, 2, 2, 30, 32), mx.float32)
    per = mx.vmap(mx.grad(f))(qs)
    for n in range(3):
        np.testing.assert_allclose(np.array(per[n]), np.array(mx.grad(f)(qs[n])), rtol=1e-5,
                                   atol=1e-6)


def test_jvp_raises_clearly(rng):
    q = rand(rng, (1, 1, 4, 32), mx.float32)
    with pytest.raises(ValueError, match=r"\[FlashAttention\] jvp .* not implemented"):
        mx.jvp(lambda q: fa.attention(q, q, q), [q], [q])


class TinyModel(nn.Module):
    def __init__(self, attend, dims=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dims, 3 * dims)
        self.out = nn.Linear(dims, dims)
        self.attend = attend

    def __call__(self, x):
        B, L, _ = x.shape
        q, k, v = (t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
                   for t in mx.split(self.qkv(x), 3, axis=-1))
        o = self.attend(q, k, v)
        return self.out(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def train(attend, steps=5):
    mx.random.seed(3)
    model = TinyModel(attend)
    opt = optim.Adam(learning_rate=1e-2)
    x = mx.random.normal((2, 40, 64))
    y = mx.random.normal((2, 40, 64))

    def loss_fn(model, x, y):
        return ((model(x) - y) ** 2).mean()

    step = mx.compile(lambda x, y: nn.value_and_grad(model, loss_fn)(model, x, y),
                      inputs=model.state, outputs=model.state)
    losses = []
    for _ in range(steps):
        loss, grads = step(x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    return losses


def test_training_matches_mlx_sdpa():
    ours = train(lambda q, k, v: fa.attention(q, k, v, causal=True))
    theirs = train(lambda q, k, v: mx.fast.scaled_dot_product_attention(
        q, k, v, scale=q.shape[-1] ** -0.5, mask="causal"))
    assert ours[-1] < ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


# As test_16bit_outputs_rounded_to_nearest (test_forward.py), for dV = P^T dO
# (dQ and dK go through Delta = rowsum(dO * O), where O is the 16-bit
# output: not float32's; all three are written by the same conversion).
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_16bit_grads_rounded_to_nearest(rng, dtype, causal):
    if dtype == mx.bfloat16 and fa.cpu_isa() in BF16_DOT_ISAS:
        pytest.skip("bfloat16 runs on bfloat16 dot products in this build")
    q, k, v, do = (rand(rng, (1, 4, n, 64), dtype) for n in (150, 170, 170, 150))

    def dv(*xs):
        f = lambda q, k, v: fa.attention(q, k, v, causal=causal)
        return mx.vjp(f, list(xs[:3]), [xs[3]])[1][2]

    same = np.array(dv(q, k, v, do) == dv(*(x.astype(mx.float32) for x in (q, k, v, do))).astype(dtype))
    assert same.mean() > 0.99, f"{same.mean():.3f} of dV rounded as float32's"
