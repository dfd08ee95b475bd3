"""FlashAttention-2 for MLX, as a native MLX extension.

``attention`` is a drop-in for ``mx.fast.scaled_dot_product_attention`` with
more options; see README.md for the feature table.
"""

import mlx.core as mx  # registers mx.array with nanobind before _ext loads

from . import _ext

__all__ = ["attention", "attention_varlen", "cpu_isa", "has_metal", "patch_mlx_lm", "unpatch_mlx_lm", "patched_mlx_lm"]

cpu_isa = _ext.cpu_isa


def has_metal():
    """Whether this build carries the Metal kernels (built on a Mac with MLX's Metal backend)."""
    return _ext.has_metal


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
    dropout_p=0.0,
    key=None,
    q_lengths=None,
    kv_lengths=None,
    padding_side="right",
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
        dropout_p: attention dropout probability in [0, 1); kept
            probabilities are scaled by ``1 / (1 - dropout_p)``.
        key: ``mx.random.key`` for dropout; by default drawn from MLX's
            global random state. The same key gives the same mask, in the
            forward and the backward pass.
        q_lengths, kv_lengths: ``(B,)`` valid query / key rows per batch
            entry of a padded batch (no dense mask needed); other rows output
            zeros. Causal and window alignment is within the valid rows.
        padding_side: ``"right"`` (valid rows first) or ``"left"``.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Lq)``.
        stream: MLX stream or device.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype, or ``(out, lse)``.
    """
    _check_arrays(q, k, v)
    key = _dropout_key(dropout_p, key)
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
    out, lse = _ext.attention(
        q,
        k,
        v,
        scale=scale,
        mask_mode=mask_mode,
        mask=mask_array,
        causal=bool(causal),
        window_size=_window(window_size),
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        dropout_p=float(dropout_p),
        key=key,
        q_lengths=q_lengths,
        kv_lengths=kv_lengths,
        padding_side=padding_side,
        stream=stream,
    )
    return (out, lse) if return_lse else out


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    sinks=None,
    dropout_p=0.0,
    key=None,
    return_lse=False,
    stream=None,
):
    """Attention over packed variable-length sequences (FlashAttention's layout).

    Args:
        q: ``(total_q, Hq, D)``: the queries of all sequences, one after another.
        k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``.
        cu_seqlens_q, cu_seqlens_k: ``(B + 1,)`` int32 cumulative offsets,
            starting at 0 and ending at total_q / total_k; sequence b owns rows
            ``[cu[b], cu[b + 1])`` (empty sequences allowed). They are read on
            the host to check them.
        max_seqlen_q, max_seqlen_k: the longest sequence of each.
        Other options as in :func:`attention`, per sequence (causal and window
        are bottom-right aligned within each sequence; slopes and sinks may be
        ``(B, Hq)``). Mask arrays are not supported here.

    Returns:
        ``out (total_q, Hq, Dv)``, or ``(out, lse)`` with ``lse (Hq, total_q)``.
    """
    _check_arrays(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    key = _dropout_key(dropout_p, key)
    out, lse = _ext.attention_varlen(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        int(max_seqlen_q),
        int(max_seqlen_k),
        scale=scale,
        causal=bool(causal),
        window_size=_window(window_size),
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        dropout_p=float(dropout_p),
        key=key,
        stream=stream,
    )
    return (out, lse) if return_lse else out


def _check_arrays(q, k, v, **more):
    for name, x in (("q", q), ("k", k), ("v", v), *more.items()):
        if not isinstance(x, mx.array):
            raise ValueError(
                f"[mlx_flash_attn.attention] {name} must be an mlx.core.array; "
                f"got {type(x).__name__}"
            )


def _dropout_key(dropout_p, key):
    # MLX's Python random state (what mx.random.seed sets) lives in Python.
    if key is None and dropout_p > 0:
        return mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
    return key


def _window(window_size):
    try:
        left, right = window_size
        return (int(left), int(right))
    except (TypeError, ValueError):
        raise ValueError(
            "[mlx_flash_attn.attention] window_size must be a pair of ints "
            f"(left, right); got {window_size!r}"
        ) from None


_LM_PATCH_NAMES = ("patch_mlx_lm", "unpatch_mlx_lm", "patched_mlx_lm")


def __getattr__(name):
    # mlx-lm helpers load on first use, so importing this package never imports mlx_lm.
    if name in _LM_PATCH_NAMES:
        from . import lm_patch

        return getattr(lm_patch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
