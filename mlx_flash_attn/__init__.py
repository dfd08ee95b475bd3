"""FlashAttention-2 for MLX, as a native MLX extension.

``attention`` is a drop-in for ``mx.fast.scaled_dot_product_attention`` with
more options; see README.md for the feature table.
"""

import mlx.core as mx  # registers mx.array with nanobind before _ext loads

from . import _ext

__all__ = ["attention", "cpu_isa", "patch_mlx_lm", "unpatch_mlx_lm", "patched_mlx_lm"]

cpu_isa = _ext.cpu_isa


def attention(
    q,
    k,
    v,
    *,
    scale=None,
    mask=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    return_lse=False,
    stream=None,
):
    """Fused attention ``softmax(q @ k^T * scale + bias) @ v``.

    Args:
        q: ``(B, Hq, Lq, D)`` queries; float32, float16 or bfloat16.
        k: ``(B, Hk, Lk, D)`` keys, ``Hq % Hk == 0`` (GQA/MQA).
        v: ``(B, Hk, Lk, Dv)`` values.
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        mask: ``None``, ``"causal"``, a boolean array (True keeps) or an
            additive array, broadcastable to ``(B, Hq, Lq, Lk)``.
        causal: bottom-right aligned causal mask (query i sees key j iff
            ``j <= i + Lk - Lq``).
        window_size: ``(left, right)`` sliding window around the aligned
            diagonal; -1 leaves a side unbounded.
        softcap: if > 0, scores s become ``softcap * tanh(s / softcap)``.
        alibi_slopes: ``(Hq,)`` or ``(B, Hq)``; adds
            ``-slope * |i + Lk - Lq - j|``.
        sinks: ``(Hq,)`` or ``(B, Hq)`` extra logits in each softmax
            denominator (attention sinks, as in MLX and gpt-oss).
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Lq)``.
        stream: MLX stream or device.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype, or ``(out, lse)``.
    """
    mask_mode, mask_array = "", None
    if isinstance(mask, str):
        mask_mode = mask
    elif mask is not None:
        if not isinstance(mask, mx.array):
            raise ValueError(
                "[mlx_flash_attn.attention] mask must be None, \"causal\" or an "
                f"mlx.core.array; got {type(mask).__name__}"
            )
        mask_array = mask
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, mx.array):
            raise ValueError(
                f"[mlx_flash_attn.attention] {name} must be an mlx.core.array; "
                f"got {type(x).__name__}"
            )
    try:
        left, right = window_size
        window = (int(left), int(right))
    except (TypeError, ValueError):
        raise ValueError(
            "[mlx_flash_attn.attention] window_size must be a pair of ints "
            f"(left, right); got {window_size!r}"
        ) from None
    out, lse = _ext.attention(
        q,
        k,
        v,
        scale=scale,
        mask_mode=mask_mode,
        mask=mask_array,
        causal=bool(causal),
        window_size=window,
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        stream=stream,
    )
    return (out, lse) if return_lse else out


_LM_PATCH_NAMES = ("patch_mlx_lm", "unpatch_mlx_lm", "patched_mlx_lm")


def __getattr__(name):
    # mlx-lm helpers load on first use, so importing this package never imports mlx_lm.
    if name in _LM_PATCH_NAMES:
        from . import lm_patch

        return getattr(lm_patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
