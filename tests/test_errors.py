"""Every invalid argument raises ValueError naming it and what was expected."""

import mlx.core as mx
import pytest

import mlx_flash_attn as fa

q = mx.zeros((2, 4, 8, 64))
k = mx.zeros((2, 2, 10, 64))
v = mx.zeros((2, 2, 10, 32))

CASES = [
    ("q 3-D", dict(q=mx.zeros((4, 8, 64))), r"q must be 4-D \(B, Hq, Lq, D\); got shape \(4, 8, 64\)"),
    ("k 5-D", dict(k=mx.zeros((1, 2, 2, 10, 64))), r"k must be 4-D"),
    ("v 2-D", dict(v=mx.zeros((10, 32))), r"v must be 4-D \(B, Hk, Lk, Dv\)"),
    ("int q", dict(q=mx.zeros((2, 4, 8, 64), dtype=mx.int32)), r"q must be float32, float16 or bfloat16; got int32"),
    ("float64 k", dict(k=mx.zeros((2, 2, 10, 64), dtype=mx.float64)), r"k must be float32, float16 or bfloat16; got float64"),
    ("mixed dtypes", dict(v=mx.zeros((2, 2, 10, 32), dtype=mx.float16)), r"q, k and v must have the same dtype"),
    ("batch", dict(k=mx.zeros((3, 2, 10, 64))), r"same batch size B"),
    ("kv heads", dict(v=mx.zeros((2, 1, 10, 32))), r"k and v must have the same heads and length"),
    ("kv length", dict(v=mx.zeros((2, 2, 11, 32))), r"k and v must have the same heads and length"),
    ("head dim", dict(k=mx.zeros((2, 2, 10, 32))), r"k must have q's head dim D = 64"),
    ("head ratio", dict(k=mx.zeros((2, 3, 10, 64)), v=mx.zeros((2, 3, 10, 32))),
     r"query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("D too big", dict(q=mx.zeros((2, 4, 8, 512)), k=mx.zeros((2, 2, 10, 512))), r"head dim D must be in \[1, 256\]; got 512"),
    ("Dv too big", dict(v=mx.zeros((2, 2, 10, 300))), r"value head dim Dv must be in \[1, 256\]; got 300"),
    ("mask shape", dict(mask=mx.zeros((8, 11), dtype=mx.bool_)),
     r"mask must be broadcastable to \(B, Hq, Lq, Lk\) = \(2, 4, 8, 10\); got shape \(8, 11\)"),
    ("mask 5-D", dict(mask=mx.zeros((1, 2, 4, 8, 10))), r"mask must be broadcastable"),
    ("mask int", dict(mask=mx.zeros((8, 10), dtype=mx.int32)), r"mask must be a boolean array .* got int32"),
    ("mask string", dict(mask="upper"), r"mask must be None, \"causal\" or an array"),
    ("mask list", dict(mask=[[True]]), r"mask must be None, \"causal\" or an mlx.core.array; got list"),
    ("window", dict(window_size=(-2, 0)), r"window_size must be \(left, right\) with each >= 0, or -1"),
    ("window type", dict(window_size=3), r"window_size must be a pair of ints"),
    ("softcap", dict(softcap=-1.0), r"softcap must be a finite number >= 0"),
    ("softcap inf", dict(softcap=float("inf")), r"softcap must be a finite number >= 0"),
    ("scale", dict(scale=float("nan")), r"scale must be finite"),
    ("slopes shape", dict(alibi_slopes=mx.zeros((3,))),
     r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\); got \(3,\)"),
    ("slopes dtype", dict(alibi_slopes=mx.zeros((4,), dtype=mx.int32)), r"alibi_slopes must be a floating-point array"),
    ("sinks shape", dict(sinks=mx.zeros((2, 2))), r"sinks must have shape \(Hq,\) = \(4,\)"),
    ("q numpy", dict(q=[1.0]), r"q must be an mlx.core.array; got list"),
]


@pytest.mark.parametrize("what,override,message", CASES, ids=[c[0] for c in CASES])
def test_invalid_argument(what, override, message):
    args = dict(q=q, k=k, v=v)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        mx.eval(fa.attention(**args))


def test_gpu_stream_runs_the_metal_kernels():
    """Only on a Mac: the Metal kernels are otherwise verified in emulation
    (tests/metal); this is the one check of eval_gpu on a real GPU."""
    if not mx.metal.is_available():
        pytest.skip("no Metal device on this machine")
    x = [mx.random.normal(a.shape, key=mx.random.key(i)) for i, a in enumerate((q, k, v))]
    out = fa.attention(*x, causal=True, stream=mx.gpu)
    ref = fa.attention(*x, causal=True, stream=mx.cpu)
    assert mx.allclose(out, ref, rtol=1e-4, atol=1e-4).item()
