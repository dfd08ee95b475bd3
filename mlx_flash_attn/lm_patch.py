"""Route mlx-lm's attention through ``mlx_flash_attn.attention``.

``patch_mlx_lm()`` swaps, in every loaded ``mlx_lm`` module and in every one
imported later (an import hook), the objects through which mlx-lm attends:

- ``mlx_lm.models.base.scaled_dot_product_attention`` and every module-level
  alias of it (model files do ``from .base import scaled_dot_product_attention``);
- ``mx.fast.scaled_dot_product_attention`` calls written directly in model
  files (deepseek_v41, plamo2, muse_spark in mlx-lm 0.32): those modules get
  a proxy ``mx`` whose ``mx.fast.scaled_dot_product_attention`` is ours;
  ``mlx.core`` itself is never modified;
- hand-written softcap attention: ``gemma2.Attention.__call__`` and
  ``gear._softcap_attention`` (softcap is native in the kernel);
- ``create_causal_mask`` (wrapped, same result): masks it builds are
  remembered, so a mask known to be "causal + sliding window (+ batch
  padding)" runs as ``causal=True, window_size=(w - 1, 0)`` (the kernel skips
  masked blocks) plus at most a ``(B, 1, 1, Lk)`` padding mask, instead of a
  dense ``(B, 1, Lq, Lk)`` array.

Handed back to the original mlx-lm / MLX code (same results as unpatched):

- quantized KV caches (``kv_bits``; caches with ``.bits``): the kernel does
  not read quantized keys/values, so mlx-lm's
  ``quantized_scaled_dot_product_attention`` runs;
- GPU default device / GPU streams: the Metal kernels are verified only in
  emulation so far (never on an Apple GPU), so on a Mac with the default GPU
  device everything goes to
  ``mx.fast.scaled_dot_product_attention`` as before (set
  ``mx.set_default_device(mx.cpu)`` to use the CPU kernel);
- head dims above 256 or dtypes other than float32/float16/bfloat16.

Not covered: models that compute attention with hand-written matmuls other
than the two above (e.g. olmo's ``attend``).

``unpatch_mlx_lm()`` puts back exactly the objects it replaced (only where
they are still ours, so a later patch by someone else is left alone).
"""

import contextlib
import importlib.abc
import sys
import threading
import weakref

import mlx.core as mx

import mlx_flash_attn as _fa  # _fa.attention looked up per call (wrappable)

_SUPPORTED_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_MAX_HEAD_DIM = 256

_lock = threading.RLock()
_state = None  # a _PatchState while patched


# --------------------------------------------------------------------------
# Attention: the replacements and the mask translation


def _on_gpu(stream=None):
    if stream is None:
        device = mx.default_device()
    else:
        device = getattr(stream, "device", stream)
    return getattr(device, "type", None) == mx.gpu


def _kernel_can_run(q, k, v, stream=None):
    return (
        not _on_gpu(stream)
        and q.dtype in _SUPPORTED_DTYPES
        and q.shape[-1] <= _MAX_HEAD_DIM
        and v.shape[-1] <= _MAX_HEAD_DIM
    )


# Masks made by create_causal_mask, by id, with their recipe. Weak references:
# an entry goes when its array does, so no mask memory is held and a reused
# id cannot match a stale entry.
_masks = {}


def _remember_mask(mask, recipe):
    key = id(mask)

    def forget(ref):
        if _masks.get(key, (None,))[0] is ref:
            _masks.pop(key, None)

    _masks[key] = (weakref.ref(mask, forget), recipe)


def _recall_mask(mask):
    entry = _masks.get(id(mask))
    if entry is not None and entry[0]() is mask:
        return entry[1]
    return None


def _native_mask(recipe, Lq, Lk):
    """Kernel arguments equal to a create_causal_mask recipe, or None."""
    N, offset, window, right_pad, left_pad = recipe
    # The recipe is only valid if q/k are the rows/columns it was made for.
    if not isinstance(offset, int) or Lq != N or Lk != offset + N:
        return None
    if window is not None and (not isinstance(window, int) or window < 1):
        return None
    kwargs = {"causal": True}
    if window is not None:
        kwargs["window_size"] = (window - 1, 0)
    keep = None
    j = mx.arange(Lk)
    if left_pad is not None:
        keep = mx.expand_dims(left_pad, (1, 2, 3)) <= j
    if right_pad is not None:
        right = j < mx.expand_dims(Lk - right_pad, (1, 2, 3))
        keep = right if keep is None else keep & right
    if keep is not None:
        kwargs["mask"] = keep  # (B, 1, 1, Lk)
    return kwargs


def _attend(q, k, v, scale, mask, sinks=None, softcap=0.0, stream=None):
    kwargs = {}
    if isinstance(mask, str):
        if mask == "causal":
            kwargs["causal"] = True
        else:
            kwargs["mask"] = mask  # let the extension judge it
    elif mask is not None:
        recipe = _recall_mask(mask)
        native = recipe and _native_mask(recipe, q.shape[2], k.shape[2])
        kwargs.update(native or {"mask": mask})
    return _fa.attention(
        q, k, v, scale=scale, sinks=sinks, softcap=softcap or 0.0,
        stream=stream, **kwargs,
    )


# Originals, filled in by patch_mlx_lm().
_orig = {}


def scaled_dot_product_attention(
    queries, keys, values, cache, scale, mask, sinks=None
):
    """Stands in for ``mlx_lm.models.base.scaled_dot_product_attention``."""
    if hasattr(cache, "bits") or not _kernel_can_run(queries, keys, values):
        return _orig["sdpa"](
            queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks
        )
    return _attend(queries, keys, values, scale, mask, sinks)


def fast_scaled_dot_product_attention(
    q, k, v, *, scale, mask=None, sinks=None, stream=None, **kwargs
):
    """Stands in for ``mx.fast.scaled_dot_product_attention`` in model files."""
    if kwargs or not _kernel_can_run(q, k, v, stream):
        return _orig["fast_sdpa"](
            q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream, **kwargs
        )
    return _attend(q, k, v, scale, mask, sinks, stream=stream)


def create_causal_mask(
    N, offset=0, window_size=None, right_padding=None, left_padding=None
):
    """``mlx_lm.models.base.create_causal_mask``, remembering what it made."""
    mask = _orig["create_causal_mask"](
        N,
        offset,
        window_size=window_size,
        right_padding=right_padding,
        left_padding=left_padding,
    )
    _remember_mask(mask, (N, offset, window_size, right_padding, left_padding))
    return mask


def _softcap_attention(queries, keys, values, scale, softcap, mask):
    """Stands in for ``mlx_lm.models.gear._softcap_attention``."""
    if not _kernel_can_run(queries, keys, values):
        return _orig["gear_softcap"](queries, keys, values, scale, softcap, mask)
    return _attend(queries, keys, values, scale, mask, softcap=softcap)


def _gemma2_attention_call(self, x, mask=None, cache=None):
    """``gemma2.Attention.__call__`` with the softcapped attention fused."""
    if (
        hasattr(cache, "bits")
        or _on_gpu()
        or x.dtype not in _SUPPORTED_DTYPES
        or self.head_dim > _MAX_HEAD_DIM
    ):
        return _orig["gemma2_call"](self, x, mask, cache)
    B, L, _ = x.shape
    queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    queries = queries.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
    keys = keys.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:
        queries = self.rope(queries)
        keys = self.rope(keys)
    output = _attend(
        queries, keys, values, self.scale, mask,
        softcap=self.attn_logit_softcapping,
    )
    output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
    return self.o_proj(output)


class _Proxy:
    """Reads through to ``target`` except for the names given."""

    def __init__(self, target, **overrides):
        self.__dict__.update(overrides)
        self.__dict__["_target"] = target

    def __getattr__(self, name):
        return getattr(self._target, name)

    def __repr__(self):
        return f"<mlx_flash_attn proxy of {self._target!r}>"


# --------------------------------------------------------------------------
# Patching


class _PatchState:
    def __init__(self):
        self.swaps = []  # (owner, name, original, replacement)
        self.done = set()  # ids of modules already handled
        self.finder = _Finder()
        self.mx_proxy = _Proxy(
            mx,
            fast=_Proxy(
                mx.fast,
                scaled_dot_product_attention=fast_scaled_dot_product_attention,
            ),
        )

    def swap(self, owner, name, replacement, original=None):
        if original is None:
            original = getattr(owner, name)
            setattr(owner, name, replacement)
        self.swaps.append((owner, name, original, replacement))


def _calls_fast_sdpa(module):
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return "fast.scaled_dot_product_attention" in f.read()
    except OSError:
        return False


def _patch_module(state, module):
    name = getattr(module, "__name__", "")
    if not name.startswith("mlx_lm") or id(module) in state.done:
        return
    state.done.add(id(module))
    pairs = [
        (_orig["sdpa"], scaled_dot_product_attention),
        (_orig["create_causal_mask"], create_causal_mask),
        (_orig["fast_sdpa"], fast_scaled_dot_product_attention),
    ]
    for attr, value in list(vars(module).items()):
        for original, ours in pairs:
            if value is original:
                state.swap(module, attr, ours)
            elif value is ours:
                # Imported while patched (``from .base import ...`` got ours):
                # only note it, so that unpatching restores the original.
                state.swap(module, attr, ours, original=original)
    # base's own mx.fast call is the original sdpa, kept for the fallbacks.
    if (
        name != "mlx_lm.models.base"
        and vars(module).get("mx") is mx
        and _calls_fast_sdpa(module)
    ):
        state.swap(module, "mx", state.mx_proxy)
    if name == "mlx_lm.models.gemma2" and hasattr(module, "Attention"):
        _orig["gemma2_call"] = module.Attention.__dict__["__call__"]
        state.swap(module.Attention, "__call__", _gemma2_attention_call)
    if name == "mlx_lm.models.gear" and hasattr(module, "_softcap_attention"):
        _orig["gear_softcap"] = module._softcap_attention
        state.swap(module, "_softcap_attention", _softcap_attention)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then patches the new module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            if _state is not None:
                _patch_module(_state, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Hooks modules of mlx_lm imported while patched."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("mlx_lm."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def is_patched():
    """True while mlx-lm's attention goes through mlx_flash_attn."""
    return _state is not None


def patch_mlx_lm():
    """Send every attention call of mlx-lm models through ``mlx_flash_attn``.

    Covers models imported before and after this call. Idempotent. Quantized
    KV caches, GPU devices/streams (the Metal kernels are not yet verified on
    an Apple GPU: on a Mac with the default GPU device nothing changes) and head dims > 256 are handed back
    to mlx-lm's own code. See this module's docstring for the details.
    """
    global _state
    import mlx_lm.models.base as base
    import mlx_lm.models.cache  # noqa: F401  (holds create_causal_mask)

    with _lock:
        if _state is not None:
            return
        _orig["sdpa"] = base.scaled_dot_product_attention
        _orig["create_causal_mask"] = base.create_causal_mask
        _orig["fast_sdpa"] = mx.fast.scaled_dot_product_attention
        state = _PatchState()
        for module in list(sys.modules.values()):
            if module is not None:
                _patch_module(state, module)
        sys.meta_path.insert(0, state.finder)
        _state = state


def unpatch_mlx_lm():
    """Undo ``patch_mlx_lm``: every replaced object is put back. Idempotent."""
    global _state
    with _lock:
        state, _state = _state, None
        if state is None:
            return
        if state.finder in sys.meta_path:
            sys.meta_path.remove(state.finder)
        for owner, name, original, replacement in reversed(state.swaps):
            if owner.__dict__.get(name) is replacement:
                setattr(owner, name, original)
        _masks.clear()


@contextlib.contextmanager
def patched_mlx_lm():
    """``with patched_mlx_lm(): ...`` patches for the block, then restores
    (also on exceptions); nested or already patched: leaves it patched."""
    was_patched = is_patched()
    patch_mlx_lm()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_mlx_lm()
