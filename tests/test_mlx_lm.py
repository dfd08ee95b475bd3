"""mlx-lm integration: patch_mlx_lm() routes every model's attention through
mlx_flash_attn.attention. Tiny random models built in code, float32."""

import gc
import importlib
import subprocess
import sys

import pytest

mlx_lm = pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.generate import batch_generate, generate, generate_step, stream_generate  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import mlx_flash_attn as fa  # noqa: E402
from mlx_flash_attn import lm_patch  # noqa: E402

ATOL = 2e-4

COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=100, rms_norm_eps=1e-5)
CONFIGS = {
    # GQA 4:2; head_dim 32 so that KV-cache quantization (group 32) applies.
    "llama": dict(
        COMMON, model_type="llama", intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    ),
    # Hand-written softcap attention (small cap so that it matters).
    "gemma2": dict(
        COMMON, model_type="gemma2", intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16.0,
        attn_logit_softcapping=1.0, final_logit_softcapping=30.0,
    ),
    # Layer 0 sliding window of 8 (RotatingKVCache), layer 1 global.
    "gemma3": dict(
        COMMON, model_type="gemma3_text", intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16.0, sliding_window=8, sliding_window_pattern=2,
    ),
    # Attention sinks, sliding + full layers, MoE.
    "gpt_oss": dict(
        COMMON, model_type="gpt_oss", intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "qwen3": dict(
        COMMON, model_type="qwen3", intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=10000.0,
    ),
}
NAMES = list(CONFIGS)
_models = {}


def build(name):
    if name not in _models:
        cfg = CONFIGS[name]
        module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
        mx.random.seed(sum(map(ord, name)))
        model = module.Model(module.ModelArgs.from_dict(cfg))
        if name == "gpt_oss":  # default sinks are zeros; make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks = mx.random.normal(layer.self_attn.sinks.shape)
        mx.eval(model.parameters())
        _models[name] = model
    return _models[name]


@pytest.fixture(autouse=True)
def always_unpatched():
    fa.unpatch_mlx_lm()
    yield
    fa.unpatch_mlx_lm()


def tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 100, n), dtype=mx.int32)


def run(model, toks, chunks):
    """Logits of each chunk fed in turn; chunks=None: one call without a cache."""
    if chunks is None:
        out = [model(toks[None])]
    else:
        cache, out, i = make_prompt_cache(model), [], 0
        for n in chunks:
            out.append(model(toks[None, i : i + n], cache=cache))
            i += n
    mx.eval(out)
    return out


SCENARIOS = {
    "prefill_nocache": (20, None),
    "prefill_short": (5, [5]),
    "prefill_cache": (20, [20]),
    "chunked_prefill": (24, [7, 7, 7, 3]),
    "decode": (30, [14] + [1] * 16),  # decodes past the window of 8
    "chunk_after_decode": (30, [12] + [1] * 6 + [5, 3, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match(name, scenario):
    model = build(name)
    n, chunks = SCENARIOS[scenario]
    toks = tokens(n)
    ref = run(model, toks, chunks)
    with fa.patched_mlx_lm():
        got = run(model, toks, chunks)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(np.array(g), np.array(r), atol=ATOL, rtol=ATOL)


def greedy(model, prompt, n=12, **kwargs):
    gen = generate_step(prompt, model, max_tokens=n, **kwargs)
    return [int(t) for t, _ in gen]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens(name):
    model = build(name)
    prompt = tokens(19, seed=1)
    ref = greedy(model, prompt, prefill_step_size=8)
    with fa.patched_mlx_lm():
        assert greedy(model, prompt, prefill_step_size=8) == ref


class FakeTokenizer:
    """The least a TokenizerWrapper needs: token i is the character U+4E00+i."""

    eos_token_id = None
    bos_token = None
    chat_template = None
    vocab_size = 100

    def get_vocab(self):
        return {chr(0x4E00 + i): i for i in range(100)}

    def encode(self, text, add_special_tokens=True):
        return [ord(c) - 0x4E00 for c in text if 0 <= ord(c) - 0x4E00 < 100]

    def decode(self, ids, **kwargs):
        return "".join(chr(0x4E00 + i) for i in ids)

    def apply_chat_template(self, messages, **kwargs):
        raise NotImplementedError


def text_of(ids):
    return FakeTokenizer().decode(np.array(ids).tolist())


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_generate_and_stream_generate(name):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model, tok = build(name), TokenizerWrapper(FakeTokenizer())
    prompt = text_of(tokens(15, seed=2))
    ref = generate(model, tok, prompt, max_tokens=10)
    with fa.patched_mlx_lm():
        assert generate(model, tok, prompt, max_tokens=10) == ref
        parts = [r.text for r in stream_generate(model, tok, prompt, max_tokens=10)]
    assert "".join(parts) == ref and len(ref) == 10


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt_oss"])
def test_batch_generate(name):
    """Left-padded prompts of different lengths (BatchKVCache masks)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model, tok = build(name), TokenizerWrapper(FakeTokenizer())
    prompts = [np.array(tokens(n, seed=n)).tolist() for n in (5, 13, 9)]
    kw = dict(max_tokens=8, return_token_ids=True)
    ref = batch_generate(model, tok, prompts, **kw).token_ids
    with fa.patched_mlx_lm():
        got = batch_generate(model, tok, prompts, **kw).token_ids
    assert got == ref and all(len(t) == 8 for t in ref)


def test_prompt_cache_reuse():
    """A prompt cache filled while patched continues the same as unpatched."""
    model = build("gemma3")
    first, second = tokens(11, seed=3), tokens(6, seed=4)
    results = []
    for patched in (False, True):
        if patched:
            fa.patch_mlx_lm()
        cache = make_prompt_cache(model)
        a = greedy(model, first, n=5, prompt_cache=cache)
        b = greedy(model, second, n=5, prompt_cache=cache)
        results.append((a, b))
        fa.unpatch_mlx_lm()
    assert results[0] == results[1]


def test_quantized_kv_cache_falls_back():
    """kv_bits: quantized caches go to mlx-lm's quantized attention."""
    model = build("llama")
    prompt = tokens(20, seed=5)
    kw = dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0)
    ref = greedy(model, prompt, n=8, **kw)
    with fa.patched_mlx_lm():
        assert greedy(model, prompt, n=8, **kw) == ref


@pytest.fixture
def counters(monkeypatch):
    """Counts calls to mx.fast.scaled_dot_product_attention and fa.attention."""
    counts = {"mx.fast": 0, "fa": 0}
    real_fast, real_fa = mx.fast.scaled_dot_product_attention, fa.attention

    def fast(*args, **kwargs):
        counts["mx.fast"] += 1
        return real_fast(*args, **kwargs)

    def ours(*args, **kwargs):
        counts["fa"] += 1
        return real_fa(*args, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", fast)
    monkeypatch.setattr(fa, "attention", ours)
    return counts


def all_paths(model):
    run(model, tokens(20), None)
    run(model, tokens(30), [14] + [1] * 4 + [7, 5])


def test_no_call_reaches_mx_fast_when_patched(counters):
    for name in NAMES:
        all_paths(build(name))
    assert counters["mx.fast"] > 0  # the counter works
    assert counters["fa"] == 0
    counters["mx.fast"] = 0
    with fa.patched_mlx_lm():
        for name in NAMES:
            before = counters["fa"]
            all_paths(build(name))
            assert counters["fa"] > before, name
        greedy(build("llama"), tokens(9), n=4)
    assert counters["mx.fast"] == 0


def test_direct_mx_fast_callers_are_routed(counters):
    """Model files that call mx.fast.scaled_dot_product_attention themselves."""
    import mlx_lm.models.plamo2 as plamo2

    q = mx.random.normal((1, 4, 6, 16))
    k = mx.random.normal((1, 2, 6, 16))
    with fa.patched_mlx_lm():
        out = plamo2.mx.fast.scaled_dot_product_attention(
            q, k, k, scale=0.25, mask="causal"
        )
        assert plamo2.mx.fast.rms_norm is mx.fast.rms_norm
        assert plamo2.mx.array is mx.array
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal")
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-5)
    assert counters == {"mx.fast": 1, "fa": 1}


def test_gpu_hands_back(counters, monkeypatch):
    """Without Metal kernels, a GPU device goes to the original code."""
    monkeypatch.setattr(lm_patch, "_on_gpu", lambda stream=None: True)
    model = build("llama")
    ref = run(model, tokens(12), [8, 1])
    counters["mx.fast"] = 0
    with fa.patched_mlx_lm():
        got = run(model, tokens(12), [8, 1])
    assert counters["fa"] == 0 and counters["mx.fast"] == 4  # 2 layers x 2 calls
    for r, g in zip(ref, got):
        np.testing.assert_array_equal(np.array(g), np.array(r))


def test_native_masks_used(monkeypatch):
    """Masks from create_causal_mask become causal/window kernel options."""
    seen = []
    real = fa.attention

    def spy(q, k, v, **kw):
        seen.append((kw.get("causal"), kw.get("window_size"), kw.get("mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(fa, "attention", spy)
    with fa.patched_mlx_lm():
        run(build("gemma3"), tokens(20), None)  # window 8 < 20: mask array
        run(build("gemma3"), tokens(20), [12, 8])  # RotatingKVCache, offset 7
    windowed = [s for s in seen if s[1] == (7, 0)]
    assert len(windowed) == 3 and all(c and m is None for c, _, m in windowed)
    assert all(m is None for _, _, m in seen)
    gc.collect()
    assert not lm_patch._masks  # the mask registry holds no arrays


def originals():
    import mlx_lm.models.base as base
    import mlx_lm.models.cache as cache
    import mlx_lm.models.deepseek_v41 as deepseek_v41
    import mlx_lm.models.gear as gear
    import mlx_lm.models.gemma2 as gemma2
    import mlx_lm.models.llama as llama

    return [
        (base, "scaled_dot_product_attention", base.scaled_dot_product_attention),
        (base, "create_causal_mask", base.create_causal_mask),
        (base, "mx", base.mx),
        (cache, "create_causal_mask", cache.create_causal_mask),
        (llama, "scaled_dot_product_attention", llama.scaled_dot_product_attention),
        (deepseek_v41, "mx", deepseek_v41.mx),
        (gear, "_softcap_attention", gear._softcap_attention),
        (gemma2.Attention, "__call__", gemma2.Attention.__call__),
        (mx.fast, "scaled_dot_product_attention", mx.fast.scaled_dot_product_attention),
    ]


def assert_restored(saved):
    for owner, name, value in saved:
        assert getattr(owner, name) is value, (owner, name)


def test_patch_is_idempotent_and_unpatch_restores_identity():
    saved = originals()
    import mlx_lm.models.llama as llama
    import mlx_lm.models.deepseek_v41 as deepseek_v41

    fa.patch_mlx_lm()
    fa.patch_mlx_lm()
    assert lm_patch.is_patched()
    assert llama.scaled_dot_product_attention is lm_patch.scaled_dot_product_attention
    assert deepseek_v41.mx is not mx
    assert mx.fast.scaled_dot_product_attention is saved[-1][2]  # never touched
    fa.unpatch_mlx_lm()
    assert not lm_patch.is_patched()
    assert_restored(saved)
    fa.unpatch_mlx_lm()
    assert_restored(saved)


def test_context_manager_restores_on_exception():
    saved = originals()
    with pytest.raises(RuntimeError):
        with fa.patched_mlx_lm():
            assert lm_patch.is_patched()
            raise RuntimeError("boom")
    assert not lm_patch.is_patched()
    assert_restored(saved)
    # Nested inside an outer patch: the inner block leaves it patched.
    with fa.patched_mlx_lm():
        with fa.patched_mlx_lm():
            pass
        assert lm_patch.is_patched()
    assert_restored(saved)


def test_modules_imported_while_patched(monkeypatch):
    """A model imported after patching is routed, and restored by unpatching."""
    import mlx_lm.models as models

    fresh = ["qwen2", "plamo2"]
    for mod in fresh:
        monkeypatch.delitem(sys.modules, f"mlx_lm.models.{mod}", raising=False)
        monkeypatch.delattr(models, mod, raising=False)
    with fa.patched_mlx_lm():
        qwen2 = importlib.import_module("mlx_lm.models.qwen2")
        plamo2 = importlib.import_module("mlx_lm.models.plamo2")
        assert qwen2.scaled_dot_product_attention is lm_patch.scaled_dot_product_attention
        assert plamo2.mx is not mx
    base = importlib.import_module("mlx_lm.models.base")
    assert qwen2.scaled_dot_product_attention is base.scaled_dot_product_attention
    assert plamo2.mx is mx


def test_import_does_not_import_mlx_lm(tmp_path):
    code = "import sys, mlx_flash_attn; assert 'mlx_lm' not in sys.modules"
    # Run outside the checkout, so the installed package is the one imported.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
