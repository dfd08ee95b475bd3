"""The Metal dispatcher (cpp/metal/dispatch.cpp) on any platform: which
kernels a call launches, with which geometry and function constants. The
kernels themselves run in tests/metal."""
import mlx.core as mx
import pytest

import mlx_flash_attn as fa
from mlx_flash_attn import _ext

FC = dict(MASK_BOOL=0, MASK_ADD=1, WINDOW=2, SOFTCAP=3, ALIBI=4, SINKS=5, SEQS=6, DROPOUT=7, SPLIT=8,
          GRAD_MASK=9, GRAD_ALIBI=10, GRAD_SINKS=11)


def plan(B=1, Hq=8, Hk=8, Lq=128, Lk=128, D=64, Dv=None, dtype=mx.float16, min_split_keys=None,
         **opts):
    q = mx.zeros((B, Hq, Lq, D), dtype)
    k = mx.zeros((B, Hk, Lk, D), dtype)
    v = mx.zeros((B, Hk, Lk, D if Dv is None else Dv), dtype)
    out, _ = fa.attention(q, k, v, return_lse=True, stream=mx.cpu, **opts)
    return _ext._metal_plan(out, min_split_keys)


def on(launch):
    return {n for n, i in FC.items() if launch["constants"].get(i)}


@pytest.mark.parametrize("D,Dv,bucket", [(64, None, 64), (1, None, 32), (65, None, 80), (80, None, 80),
                                         (100, None, 128), (64, 200, 256), (256, None, 256)])
def test_head_dim_bucket(D, Dv, bucket):
    p = plan(D=D, Dv=Dv, dtype=mx.bfloat16)
    assert p["launches"][0]["kernel"] == f"flash_fwd_bfloat_{bucket}"


def test_prefill_geometry():
    p = plan(B=2, Hq=8, Hk=8, Lq=100, Lk=300)
    (fwd,) = p["launches"]
    assert fwd["grid"] == (4, 8, 2) and fwd["threads"] == (128, 1, 1)  # ceil(100 / 32) blocks
    assert p["geometry"] == dict(heads_per_block=1, rows_per_head=32, n_splits=1, split_keys=320)
    assert p["scratch"] == {}


@pytest.mark.parametrize("Hq,Hk,heads,rows", [(32, 8, 4, 8), (12, 4, 3, 10), (64, 1, 32, 1), (40, 1, 20, 1)])
def test_gqa_heads_are_stacked(Hq, Hk, heads, rows):
    p = plan(Hq=Hq, Hk=Hk, Lq=64, Lk=64)
    g = p["geometry"]
    assert (g["heads_per_block"], g["rows_per_head"]) == (heads, rows)
    assert p["launches"][0]["grid"] == (-(-64 // rows), Hq // heads, 1)


def test_decode_splits_long_keys():
    # mlx-lm decoding: Lq = 1, GQA 32/8, 8k keys: 8 blocks, far too few for a GPU.
    p = plan(Hq=32, Hk=8, Lq=1, Lk=8192)
    fwd, combine = p["launches"]
    g = p["geometry"]
    assert FC["SPLIT"] in fwd["constants"] and fwd["constants"][FC["SPLIT"]]
    assert g["n_splits"] == 32 and g["split_keys"] == 256  # 8 blocks x 32 splits = 256 threadgroups
    assert fwd["grid"] == (32, 8, 1)
    assert combine["kernel"] == "flash_fwd_combine_half" and combine["grid"] == (32, 1, 1)
    assert p["scratch"] == {11: 32 * 32 * 64, 12: 32 * 32}


def test_no_split_for_short_keys_or_many_blocks():
    assert plan(Hq=32, Hk=8, Lq=1, Lk=300)["geometry"]["n_splits"] == 1  # too few keys to split
    assert plan(B=8, Hq=32, Lq=1024, Lk=4096)["geometry"]["n_splits"] == 1  # enough blocks


def test_option_constants():
    p = plan(causal=True, softcap=5.0, sinks=mx.zeros(8), alibi_slopes=mx.zeros(8),
             mask=mx.zeros((128, 128)))
    assert on(p["launches"][0]) == {"WINDOW", "SOFTCAP", "SINKS", "ALIBI", "MASK_ADD"}
    assert on(plan(mask=mx.ones((128, 128), mx.bool_))["launches"][0]) == {"MASK_BOOL"}
    assert on(plan()["launches"][0]) == set()
    assert on(plan(dropout_p=0.1)["launches"][0]) == {"DROPOUT"}
    assert on(plan(q_lengths=mx.array([5]))["launches"][0]) == {"SEQS"}


def test_backward_plan():
    q = mx.zeros((2, 8, 100, 64), mx.float32)
    k = mx.zeros((2, 2, 70, 64), mx.float32)

    def loss(q, k, v, mask, sinks):
        return fa.attention(q, k, v, mask=mask, sinks=sinks, causal=True, stream=mx.cpu).sum()

    g = mx.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, k, mx.zeros((100, 70)), mx.zeros(8))
    p = _ext._metal_plan(g[0], None)
    names = [l["kernel"] for l in p["launches"]]
    assert names == ["flash_bwd_delta_float", "flash_bwd_dq_float_64", "flash_bwd_dkv_float_64",
                     "flash_bwd_head_sums"]
    delta, dq, dkv, sums = p["launches"]
    assert delta["grid"] == (2 * 8 * 100, 1, 1)
    assert dq["grid"] == (4, 8, 2) and dkv["grid"] == (3, 2, 2)
    assert on(dq) == {"WINDOW", "MASK_ADD", "SINKS", "GRAD_MASK", "GRAD_SINKS"}
    assert sums["grid"] == (16, 1, 1)
    assert p["scratch"] == {15: 2 * 8 * 100, 20: 2 * 8 * 4 * 2}
    assert [o[0] for o in p["outputs"]] == [16, 17, 18, 19, 22]  # dq dk dv dmask dsinks
