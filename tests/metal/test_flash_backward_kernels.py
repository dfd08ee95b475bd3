"""The Metal backward kernels under the emulator, against float64 PyTorch
autograd with the CPU backward tests' tolerances."""
import mlx.core as mx
import numpy as np
import pytest

import flash_metal as fm
import msl
from reference import DTYPES, rand, to64, to_torch, torch_attention

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.metal,
    pytest.mark.skipif(msl.clang() is None, reason="clang++-19 is not installed (apt-get install -y clang-19)"),
]

GRAD_TOL = {mx.float32: 2e-5, mx.float16: 5e-3, mx.bfloat16: 4e-2}


def check(rng, dtype=mx.float32, B=2, Hq=2, Hk=None, Lq=37, Lk=45, D=64, Dv=None, diff=(),
          **opts):
    Hk = Hq if Hk is None else Hk
    Dv = D if Dv is None else Dv
    q = rand(rng, (B, Hq, Lq, D), dtype)
    k = rand(rng, (B, Hk, Lk, D), dtype)
    v = rand(rng, (B, Hk, Lk, Dv), dtype)
    dout = rand(rng, (B, Hq, Lq, Dv), mx.float32)
    dlse = rand(rng, (B, Hq, Lq), mx.float32)
    diff_args = [opts[n] for n in diff]
    grads, run = fm.grads(q, k, v, dout, dlse, diff=diff, **opts)

    targs = [to_torch(x) for x in [q, k, v, *diff_args]]
    topts = {n: to_torch(x) if isinstance(x, mx.array) else x for n, x in opts.items() if n not in diff}
    out, lse = torch_attention(*targs[:3], **dict(zip(diff, targs[3:])), **topts)
    loss = (out * torch.from_numpy(to64(dout))).sum() + (
        torch.where(torch.isinf(lse), 0.0, lse) * torch.from_numpy(to64(dlse))).sum()
    loss.backward()
    for name, g, t in zip(["q", "k", "v", *diff], grads, targs):
        assert g.shape == tuple(t.shape), f"d{name} shape {g.shape} != {tuple(t.shape)}"
        g64, ref = to64(g), t.grad.numpy()
        assert np.all(np.isfinite(g64)), f"d{name} has NaN/inf (unwritten elements?)"
        err = np.abs(g64 - ref).max() / max(np.abs(ref).max(), 1e-6)
        tol = GRAD_TOL[dtype] * (1 if name in ("q", "k", "v") else 2)
        assert err <= tol, f"d{name}: relative error {err:.3g} > {tol:.1g} ({dtype})"
    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 192, 256])
def test_head_dims(rng, dtype, D):
    run = check(rng, dtype, B=1, Lq=21, Lk=35, D=D)
    names = [l["kernel"] for l in run.plan["launches"]]
    t = {mx.float32: "float", mx.float16: "half", mx.bfloat16: "bfloat"}[dtype]
    assert names == [f"flash_bwd_delta_{t}", f"flash_bwd_dq_{t}_{D}", f"flash_bwd_dkv_{t}_{D}"]


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 50), (40, 1), (64, 64), (70, 33)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths(rng, Lq, Lk, causal):
    check(rng, mx.float32, Lq=Lq, Lk=Lk, causal=causal)


@pytest.mark.parametrize("Hq,Hk", [(4, 2), (6, 1)])
def test_gqa(rng, Hq, Hk):
    check(rng, mx.float16, Hq=Hq, Hk=Hk, Lq=20, Lk=41)


@pytest.mark.parametrize("D,Dv", [(64, 32), (32, 80)])
def test_dv_differs(rng, D, Dv):
    check(rng, mx.float32, D=D, Dv=Dv)


def _opts(rng, name, B, H, Lq, Lk):
    return {
        "causal": dict(causal=True),
        "window": dict(window_size=(9, 2)),
        "softcap": dict(softcap=2.0),
        "bool_mask": dict(mask=mx.array(rng.random((B, 1, Lq, Lk)) < 0.7)),
        "alibi": dict(alibi_slopes=mx.array(rng.uniform(0.05, 0.5, H).astype(np.float32)), diff=("alibi_slopes",)),
        "sinks": dict(sinks=mx.array(rng.standard_normal(H).astype(np.float32)), diff=("sinks",)),
        "additive_mask": dict(mask=mx.array(rng.standard_normal((B, 1, Lq, Lk)).astype(np.float32)), diff=("mask",)),
    }[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", ["causal", "window", "softcap", "bool_mask", "alibi", "sinks", "additive_mask"])
def test_each_option(rng, dtype, option):
    B, H, Lq, Lk = 2, 2, 29, 43
    check(rng, dtype, B=B, Hq=H, Lq=Lq, Lk=Lk, **_opts(rng, option, B, H, Lq, Lk))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(37, 70), (70, 37)])
def test_everything_combined(rng, dtype, Lq, Lk):
    B, Hq, Hk = 2, 4, 2
    opts = dict(causal=True, window_size=(25, -1), softcap=3.0)
    diff = []
    for name in ("alibi", "sinks", "additive_mask"):
        o = _opts(rng, name, B, Hq, Lq, Lk)
        diff += o.pop("diff")
        opts.update(o)
    run = check(rng, dtype, B=B, Hq=Hq, Hk=Hk, Lq=Lq, Lk=Lk, D=80, diff=tuple(diff), **opts)
    assert run.plan["launches"][-1]["kernel"] == "flash_bwd_head_sums"


def test_fully_masked_rows_get_zero_gradient(rng):
    mask = mx.array(np.tile(np.arange(24)[:, None] % 3 != 0, (1, 40)))
    check(rng, mx.float32, Lq=24, Lk=40, mask=mask)


def test_no_threadgroup_memory_races(rng):
    B, H, Lq, Lk = 1, 2, 33, 40
    check(rng, mx.float16, B=B, Hq=H, Lq=Lq, Lk=Lk, causal=True,
          **_opts(rng, "sinks", B, H, Lq, Lk))
    q = rand(rng, (1, 2, 33, 64), mx.float16)
    dout = rand(rng, (1, 2, 33, 64), mx.float32)
    def loss(q, s):
        o, l = fm.fa.attention(q, q, q, sinks=s, causal=True, return_lse=True, stream=mx.cpu)
        return (o.astype(mx.float32) * dout).sum() + l.sum()
    lazy = mx.grad(loss, argnums=(0, 1))(q, mx.array([0.3, -0.2]))
    fm.run_plan(lazy[0], race_check=True)


def test_deterministic(rng):
    q = rand(rng, (1, 4, 50, 64), mx.float16)
    k = rand(rng, (1, 2, 60, 64), mx.float16)
    dout = rand(rng, (1, 4, 50, 64), mx.float32)
    dlse = mx.zeros((1, 4, 50))
    a, _ = fm.grads(q, k, k, dout, dlse, causal=True)
    b, _ = fm.grads(q, k, k, dout, dlse, causal=True)
    for x, y in zip(a, b):
        assert np.array_equal(np.array(x.astype(mx.float32)), np.array(y.astype(mx.float32)))


def _cpu_grads(q, k, v, dout, **opts):
    def loss(q, k, v):
        return (fm.fa.attention(q, k, v, stream=mx.cpu, **opts).astype(mx.float32) * dout).sum()
    return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_dropout_matches_cpu_kernel(rng):
    """Same counter hash on both backends: the Metal gradients equal the CPU
    kernel's (whose dropout backward is checked in test_varlen_dropout.py)."""
    q = rand(rng, (2, 2, 19, 64), mx.float32)
    k = rand(rng, (2, 2, 33, 64), mx.float32)
    v = rand(rng, (2, 2, 33, 64), mx.float32)
    dout = rand(rng, (2, 2, 19, 64), mx.float32)
    opts = dict(dropout_p=0.25, key=mx.random.key(3), causal=True)
    metal, _ = fm.grads(q, k, v, dout, mx.zeros((2, 2, 19)), **opts)
    for m, c in zip(metal, _cpu_grads(q, k, v, dout, **opts)):
        np.testing.assert_allclose(np.array(m), np.array(c), rtol=1e-4, atol=1e-5)


def test_padded_lengths_match_cpu_kernel(rng):
    q = rand(rng, (3, 2, 20, 64), mx.float32)
    k = rand(rng, (3, 2, 31, 64), mx.float32)
    dout = rand(rng, (3, 2, 20, 64), mx.float32)
    opts = dict(q_lengths=mx.array([20, 7, 0]), kv_lengths=mx.array([31, 12, 5]), causal=True)
    metal, _ = fm.grads(q, k, k, dout, mx.zeros((3, 2, 20)), **opts)
    for m, c in zip(metal, _cpu_grads(q, k, k, dout, **opts)):
        np.testing.assert_allclose(np.array(m), np.array(c), rtol=1e-4, atol=1e-5)


def test_varlen_matches_cpu_kernel(rng):
    cu, q, k, v = fm.varlen_inputs(rng, mx.float32)
    dout = rand(rng, q.shape, mx.float32)

    def loss(q, k, v):
        out = fm.fa.attention_varlen(q, k, v, cu, cu, 40, 40, causal=True, stream=mx.cpu)
        return (out * dout).sum()

    lazy = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    run = fm.run_plan(lazy[0])
    cpu = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    # The primitive's gradients are in its (1, H, total, D) layout.
    for m, c in zip(run.outputs, cpu):
        np.testing.assert_allclose(np.array(m[0].transpose(1, 0, 2)), np.array(c), rtol=1e-4, atol=1e-5)
