"""End-to-end mlx-lm prefill + decode, with and without patch_mlx_lm().

A tiny Llama built in code (random weights, no download): prefill a prompt
into a KVCache, then greedy-decode. Reports tokens/s for both phases and the
patched / unpatched ratio (> 1: mlx_flash_attn is faster).

    python benchmarks/bench_mlx_lm.py            # 1024-token prompt, 64 decode tokens
    python benchmarks/bench_mlx_lm.py --quick    # 256-token prompt, 16 decode tokens
"""

import argparse
import platform
import statistics
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash_attn as fa


def build_model(args):
    config = dict(
        model_type="llama",
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.hidden * 11 // 4,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=args.vocab,
    )
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, args.dtype))
    mx.eval(model.parameters())
    return model


def run_once(model, prompt, n_decode):
    """Returns (prefill seconds, decode seconds, generated tokens)."""
    cache = make_prompt_cache(model)
    tic = time.perf_counter()
    logits = model(prompt[None], cache=cache)
    y = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(y)
    prefill = time.perf_counter() - tic
    out = [y.item()]
    tic = time.perf_counter()
    for _ in range(n_decode - 1):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        out.append(y.item())
    decode = time.perf_counter() - tic
    return prefill, decode, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short prompt, few tokens, 1 repeat")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    if args.quick:
        args.prompt, args.decode, args.repeats = 256, 16, 1

    model = build_model(args)
    prompt = mx.random.randint(0, args.vocab, (args.prompt,))
    print(
        f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, {platform.machine()}, "
        f"device {mx.default_device()}, CPU ISA {fa.cpu_isa()}"
    )
    print(
        f"llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / "
        f"{args.kv_heads} kv heads, vocab {args.vocab}, {args.dtype}; prompt "
        f"{args.prompt} tokens, {args.decode} decode tokens, median of {args.repeats}"
    )

    results, tokens = {}, {}
    for label in ("mlx-lm (mx.fast SDPA)", "patched (mlx_flash_attn)"):
        patched = label.startswith("patched")
        if patched:
            fa.patch_mlx_lm()
        run_once(model, prompt[:64], 4)  # warm-up
        runs = [run_once(model, prompt, args.decode) for _ in range(args.repeats)]
        fa.unpatch_mlx_lm()
        prefill = statistics.median(r[0] for r in runs)
        decode = statistics.median(r[1] for r in runs)
        results[label] = (args.prompt / prefill, (args.decode - 1) / decode)
        tokens[label] = runs[0][2]

    print(f"{'':28s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for label, (pre, dec) in results.items():
        print(f"{label:28s} {pre:14.1f} {dec:13.1f}")
    (p0, d0), (p1, d1) = results.values()
    print(f"{'ratio patched / unpatched':28s} {p1 / p0:14.2f} {d1 / d0:13.2f}")
    same = tokens["mlx-lm (mx.fast SDPA)"] == tokens["patched (mlx_flash_attn)"]
    print(f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
