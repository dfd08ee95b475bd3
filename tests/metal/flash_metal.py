"""Runs the project's Metal kernels in the emulator exactly as eval_gpu would:
the launch plan, the parameter bytes and the input bytes all come from the
extension (`_ext._metal_plan`, i.e. cpp/metal/dispatch.cpp and the
primitives), and the kernels are the real sources in kernels/."""
from pathlib import Path

import mlx.core as mx
import numpy as np

import mlx_flash_attn as fa
import msl
from mlx_flash_attn import _ext

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def source_of(kernel):
    return KERNELS / ("flash_bwd.metal" if kernel.startswith("flash_bwd") else "flash_fwd.metal")


def _to_mx(buf, shape, dtype):
    if dtype == "float32":
        x = buf.view(np.float32)
    elif dtype == "float16":
        x = buf.view(np.float16).astype(np.float32)
    else:  # bfloat16: the high half of a float32
        x = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    n = int(np.prod(shape))
    return mx.array(x[:n].reshape(shape)).astype(getattr(mx, dtype))


class Run:
    """The outputs of a plan (mx arrays, in the primitive's output order),
    the plan itself and the emulator's result of every launch."""

    def __init__(self, outputs, plan, results):
        self.outputs, self.plan, self.results = outputs, plan, results

    def counters(self, launch, slot):
        return self.results[launch].counters[slot]


def run_plan(arr, min_split_keys=None, race_check=False):
    """Plans the FlashAttention(VJP) node under `arr` and runs every launch.
    Outputs and scratch buffers start as NaN bytes, so unwritten elements show."""
    plan = _ext._metal_plan(arr, min_split_keys)
    bufs = {slot: np.frombuffer(b, np.uint8).copy() for slot, b in plan["inputs"].items()}
    bufs[3] = plan["params"]  # FA_BUF_PARAMS
    for slot, shape, dtype in plan["outputs"]:
        bufs[slot] = np.full(max(int(np.prod(shape)) * ITEMSIZE[dtype], 1), 0xFF, np.uint8)
    for slot, n in plan["scratch"].items():
        bufs[slot] = np.full(max(4 * n, 1), 0xFF, np.uint8)
    results = []
    for launch in plan["launches"]:
        kern = msl.compile(source_of(launch["kernel"]), name=launch["kernel"],
                           constants=launch["constants"], include_dirs=[KERNELS])
        # Slots a call does not use get a small unread buffer, as on the GPU.
        bound = {i: bufs[i] if i in bufs else np.zeros(16, np.uint8) for i in launch["buffers"]}
        results.append(kern.launch(grid=launch["grid"], threadgroup=launch["threads"],
                                   buffers=bound, race_check=race_check))
    outputs = [_to_mx(bufs[slot], shape, dtype) for slot, shape, dtype in plan["outputs"]]
    return Run(outputs, plan, results)


def attention(q, k, v, min_split_keys=None, race_check=False, **opts):
    """mlx_flash_attn.attention through the emulated Metal kernels:
    returns (out, lse) and the Run."""
    out, _ = fa.attention(q, k, v, return_lse=True, stream=mx.cpu, **opts)
    run = run_plan(out, min_split_keys, race_check)
    return run.outputs[0], run.outputs[1], run


def grads(q, k, v, dout, dlse, diff=(), **opts):
    """The gradients of sum(out * dout) + sum(lse * dlse) through the emulated
    Metal backward, with respect to q, k, v and the options named in `diff`
    (mask, alibi_slopes, sinks), in that order, reduced to their shapes."""
    names = ["q", "k", "v", *diff]
    args = [q, k, v] + [opts.pop(n) for n in diff]

    def loss(*xs):
        out, lse = fa.attention(*xs[:3], return_lse=True, stream=mx.cpu,
                                **dict(zip(names[3:], xs[3:])), **opts)
        return (out.astype(mx.float32) * dout).sum() + (mx.where(mx.isinf(lse), 0.0, lse) * dlse).sum()

    lazy = mx.grad(loss, argnums=tuple(range(len(args))))(*args)
    run = run_plan(lazy[0])
    result = run.outputs[:3]
    # Extra gradients come in the primitive's order: mask, slopes, sinks.
    extra = dict(zip([n for n in ("mask", "alibi_slopes", "sinks") if n in diff], run.outputs[3:]))
    for name, x in zip(diff, args[3:]):
        # The primitive's gradient is per (B, Hq[, Lq, Lk]); broadcast axes of
        # the argument are summed, as the graph after the primitive does.
        g = extra[name]
        lead = g.ndim - x.ndim
        g = g.sum(axis=tuple(range(lead))) if lead else g
        axes = tuple(i for i in range(x.ndim) if x.shape[i] == 1 and g.shape[i] != 1)
        result.append(g.sum(axis=axes, keepdims=True) if axes else g)
    return result, run


SEQLENS = [5, 17, 1, 40]


def varlen_inputs(rng, dtype, Hq=4, Hk=2, D=64):
    """Packed sequences of SEQLENS: cu_seqlens and q, k, v (total, H, D)."""
    from reference import rand

    cu = mx.array(np.concatenate([[0], np.cumsum(SEQLENS)]).astype(np.int32))
    total = int(sum(SEQLENS))
    return cu, rand(rng, (total, Hq, D), dtype), rand(rng, (total, Hk, D), dtype), rand(rng, (total, Hk, D), dtype)
