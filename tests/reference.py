"""Float64 NumPy reference of mlx_flash_attn.attention, and test helpers.

The reference implements the API's rules directly, with dense L x L scores:
softcap, then ALiBi, then masks and the causal/window limits (bottom-right
aligned), then a softmax whose denominator may include a per-head sink logit.
"""

import mlx.core as mx
import numpy as np

# Largest allowed relative error, max|out - ref| / max|ref|, per input dtype.
TOL = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 3e-2}
# Gradients go through one more rounding of O (in the input dtype) than the
# forward output, hence slightly looser half-precision bounds.
GRAD_TOL = {mx.float32: 2e-5, mx.float16: 5e-3, mx.bfloat16: 4e-2}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# CPU builds (mlx_flash_attn.cpu_isa()) whose bfloat16 GEMMs run on bfloat16
# dot products, rounding P to bfloat16; the others widen bfloat16 to float32.
BF16_DOT_ISAS = ("avx512-bf16", "avx512-amx")


def to64(x):
    """An mx.array (any float dtype) as a float64 NumPy array."""
    return np.array(x.astype(mx.float32), dtype=np.float64)


def rand(rng, shape, dtype, scale=1.0):
    """Fresh normal random data, already rounded to `dtype`."""
    return mx.array(rng.standard_normal(shape).astype(np.float32) * scale).astype(dtype)


def visible(Lq, Lk, causal=False, window_size=(-1, -1)):
    """Boolean (Lq, Lk): which keys each query may see by position alone."""
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    diag = i + Lk - Lq
    keep = np.ones((Lq, Lk), dtype=bool)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left >= 0:
        keep &= j >= diag - left
    if right >= 0:
        keep &= j <= diag + right
    return keep


def reference(q, k, v, *, scale=None, mask=None, causal=False, window_size=(-1, -1),
              softcap=0.0, alibi_slopes=None, sinks=None):
    """Returns (out, lse) as float64 arrays; inputs are mx.arrays."""
    q, k, v = to64(q), to64(k), to64(v)
    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    k = np.repeat(k, Hq // Hk, axis=1)
    v = np.repeat(v, Hq // Hk, axis=1)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    if alibi_slopes is not None:
        slopes = np.broadcast_to(to64(alibi_slopes), (B, Hq))
        s = s - slopes[:, :, None, None] * np.abs(i + Lk - Lq - j)
    keep = np.broadcast_to(visible(Lq, Lk, causal, window_size), s.shape).copy()
    if isinstance(mask, str):
        assert mask == "causal"
        keep &= visible(Lq, Lk, causal=True)
    elif mask is not None and mask.dtype == mx.bool_:
        keep &= np.broadcast_to(np.array(mask), s.shape)
    elif mask is not None:
        s = s + np.broadcast_to(to64(mask), s.shape)
    s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, initial=-np.inf)
    if sinks is not None:
        sink = np.broadcast_to(to64(sinks), (B, Hq))[:, :, None]
        m = np.maximum(m, sink)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe[..., None])
    l = p.sum(axis=-1)
    if sinks is not None:
        l = l + np.exp(sink - m_safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.einsum("bhij,bhjd->bhid", p, v) / l[..., None]
        lse = m_safe + np.log(l)
    out = np.where(l[..., None] > 0, out, 0.0)
    lse = np.where(l > 0, lse, -np.inf)
    return out, lse


def rel_err(x, ref):
    """max|x - ref| / max|ref| (NaN anywhere in x gives inf)."""
    x = to64(x) if isinstance(x, mx.array) else x
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(x)):
        return np.inf
    denom = max(np.abs(ref).max(initial=0.0), 1e-6)
    return np.abs(x - ref).max(initial=0.0) / denom


def assert_close(x, ref, dtype, what="out"):
    err = rel_err(x, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


def assert_lse_close(lse, ref):
    """LSE: -inf exactly where the reference has it, else close in log space."""
    lse = to64(lse)
    assert lse.shape == ref.shape
    inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(lse), inf), "lse: -inf at the wrong rows"
    fin = ~inf
    assert np.all(np.isfinite(lse[fin])), "lse: non-finite values"
    err = np.abs(lse[fin] - ref[fin]).max(initial=0.0) / max(np.abs(ref[fin]).max(initial=0.0), 1.0)
    # LSE is always accumulated in float32, whatever the input dtype.
    assert err <= 2e-5, f"lse: relative error {err:.3g}"


def torch_attention(q, k, v, *, scale=None, mask=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, sinks=None):
    """The same rules as `reference`, on float64 torch tensors, differentiable
    in q, k, v, an additive mask, the ALiBi slopes and the sinks. Returns
    (out, lse)."""
    import torch

    B, Hq, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hk, 1)
    v = v.repeat_interleave(Hq // Hk, 1)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.expand(B, Hq)
        s = s - slopes[:, :, None, None] * (i + Lk - Lq - j).abs()
    keep = torch.from_numpy(visible(Lq, Lk, causal, window_size)).expand(s.shape)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask.expand(s.shape)
    elif mask is not None:
        s = s + mask
    s = s.masked_fill(~keep, -np.inf)
    if sinks is not None:
        sink = sinks.expand(B, Hq)[:, :, None, None].expand(B, Hq, Lq, 1)
        s = torch.cat([s, sink], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    # Rows with no visible key (lse = -inf) give 0, as the kernel does.
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - safe[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


def to_torch(x):
    import torch

    if x.dtype == mx.bool_:
        return torch.from_numpy(np.array(x))
    return torch.from_numpy(to64(x)).requires_grad_(True)


def reference_grads(q, k, v, dout, dlse, **opts):
    """Float64 autograd gradients of sum(out * dout) + sum(lse * dlse) (rows
    with lse = -inf count 0), by name: q, k, v and whichever of mask,
    alibi_slopes and sinks opts holds as differentiable mx.arrays."""
    import torch

    t = {n: to_torch(x) for n, x in (("q", q), ("k", k), ("v", v))}
    topts = {n: to_torch(x) if isinstance(x, mx.array) else x for n, x in opts.items()}
    out, lse = torch_attention(t["q"], t["k"], t["v"], **topts)
    loss = (out * torch.from_numpy(to64(dout))).sum() + (
        torch.where(torch.isinf(lse), 0.0, lse) * torch.from_numpy(to64(dlse))).sum()
    loss.backward()
    t.update({n: x for n, x in topts.items() if isinstance(x, torch.Tensor) and x.requires_grad})
    return {n: x.grad.numpy() for n, x in t.items()}


def assert_grad_close(g, ref, dtype, what):
    """A gradient (float64 array) against its reference: finite, and within
    GRAD_TOL (twice that for the mask, slopes and sinks)."""
    assert np.all(np.isfinite(g)), f"{what} has NaN/inf"
    err = np.abs(g - ref).max() / max(np.abs(ref).max(), 1e-6)
    tol = GRAD_TOL[dtype] * (1 if what in ("dq", "dk", "dv") else 2)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g} ({dtype})"
