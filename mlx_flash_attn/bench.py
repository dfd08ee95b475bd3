"""Benchmark: mlx_flash_attn.attention against mx.fast.scaled_dot_product_attention
and PyTorch's scaled_dot_product_attention, in one run.

    python benchmarks/bench.py [--quick]      (or: python -m mlx_flash_attn.bench)

Times are medians of repeated runs (at least --reps, more for short calls)
after a warm-up of at least 0.3 s, with the spread (min-max) of the runs;
a call over 20 s in warm-up is timed once. Ours and PyTorch take turns,
4 blocks of runs each, so a change in the machine's load mid-case falls
on both; a block of short calls starts after 30 ms of untimed ones, past
the other peer's spinning threads. Speed-ups are ratios of medians. GFLOP/s counts 4*B*H*Lq*Lk*D
(halved for causal) forward, 3.5x that for forward+backward (the
backward's five GEMMs on top of the forward's two), beside a GEMM ceiling
(PyTorch's matmul in float32 or, where faster, the row's 16-bit dtype)
timed in turns with each row. A decoding row reads each key once (a few
FLOPs per byte), so its ceiling is the roofline: the lower of that GEMM
ceiling and the row's FLOPs per byte of K and V times the GB/s of PyTorch
summing as many bytes, also timed in turns (marked m). The full mode ends
with the peak extra memory of a 32k-token causal call.
"""

import argparse
import math
import platform
import time

import mlx.core as mx
import numpy as np

import mlx_flash_attn as fa

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the benchmark still runs, without the PyTorch column
    torch = None

# (name, B, H, Hk, Lq, Lk, D): the seed project's nine, then long sequences.
SEED = [
    ("256 tok", 1, 8, 8, 256, 256, 64),
    ("512 tok", 1, 8, 8, 512, 512, 64),
    ("1024 tok", 1, 8, 8, 1024, 1024, 64),
    ("2048 tok", 1, 8, 8, 2048, 2048, 64),
    ("384 d128", 1, 8, 8, 384, 384, 128),
    ("768 d128", 1, 8, 8, 768, 768, 128),
    ("B2 1024", 2, 8, 8, 1024, 1024, 64),
    ("B8 1024", 8, 8, 8, 1024, 1024, 64),
    ("4096 tok", 1, 8, 8, 4096, 4096, 64),
]
LONG = [
    ("8k d128", 1, 8, 8, 8192, 8192, 128),
    ("16k d128", 1, 8, 8, 16384, 16384, 128),
]
DECODE = [  # generation: one query against a long KV cache, GQA 32/8
    ("dec 4k", 1, 32, 8, 1, 4096, 128),
    ("dec 16k", 1, 32, 8, 1, 16384, 128),
    ("dec 32k", 1, 32, 8, 1, 32768, 128),
]
QUICK = [SEED[0], SEED[2], SEED[5], DECODE[0]]

# MLX's CPU attention runs at a few GFLOP/s here; beyond this many FLOPs
# one call takes minutes, so its column is left out.
MLX_MAX_FLOP = 4e10


# A call slower than this (seconds) in warm-up is timed once more only:
# some peers have no fast path on some CPUs (PyTorch's bfloat16 backward
# without bfloat16 arithmetic: minutes per call at 16k tokens).
SLOW_CALL_S = 20.0
# Warm-up lasts `warmup` calls and at least this long (seconds): a few
# millisecond calls leave caches, allocators and clocks cold (the first
# case of a run measured ~25% slow after two).
WARMUP_S = 0.3
# Calls of a few milliseconds are timed more than `reps` times, up to
# MAX_REPS, until the timed runs span this long (seconds): a median of 7
# such calls covers a few milliseconds of a shared machine's load. (Not
# MLX's calls: they are 30-100x slower, and --quick must stay quick.)
TIMED_S = 0.5
MAX_REPS = 100


# Peers timed in one case take turns in this many blocks of runs: the load
# of a shared machine drifts over seconds (10-30% here), and timing one
# peer's runs all before the other's put that drift into their ratio.
TURNS = 4
# Calls shorter than SHORT_CALL_S (seconds) start each block with untimed
# calls lasting at least LEAD_S: the peer timed before may leave worker
# threads spinning on the cores (after PyTorch's calls, our 256-token
# calls here ran 2x slower for ~15 ms: its OpenMP workers spin, then sleep).
SHORT_CALL_S = 0.1
LEAD_S = 0.03


def warm_up(fn, reps, warmup, span):
    """Warms fn up; returns how many runs to time and the time per call."""
    start = time.perf_counter()
    n = 0
    while n < warmup or time.perf_counter() - start < WARMUP_S:
        t = time.perf_counter()
        fn()
        n += 1
        if time.perf_counter() - t > SLOW_CALL_S:
            return 1, time.perf_counter() - t
    per_call = (time.perf_counter() - start) / n
    if reps > 1:
        reps = max(reps, min(MAX_REPS, int(span / per_call)))
    return reps, per_call


def timeit(fns, reps, warmup=2, span=TIMED_S):
    """Times each of fns (name -> function) `reps` times or more (see
    warm_up), in TURNS blocks taken in turn; name -> (median, min, max) ms."""
    plan = {name: warm_up(fn, reps, warmup, span) for name, fn in fns.items()}
    turns = min([TURNS] + [n for n, _ in plan.values()])
    ts = {name: [] for name in fns}
    for turn in range(turns):
        for name, fn in fns.items():
            n, per_call = plan[name]
            if per_call < SHORT_CALL_S:
                lead = time.perf_counter()
                fn()
                while time.perf_counter() - lead < LEAD_S:
                    fn()
            for _ in range(n * (turn + 1) // turns - n * turn // turns):
                t = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t)
    return {name: (float(np.median(x) * 1e3), float(np.min(x) * 1e3), float(np.max(x) * 1e3))
            for name, x in ts.items()}


def flops(B, H, Lq, Lk, D, causal, backward=False):
    f = 4.0 * B * H * Lq * Lk * D
    if causal and Lq > 1:
        f *= 0.5
    return f * 3.5 if backward else f


def matmul(dtype, n):
    """A square n x n matmul in PyTorch and its FLOP count."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return (lambda: a @ b), 2.0 * n**3


def stream_read(nbytes):
    """A PyTorch sum over nbytes of float32: the rate at which the machine
    streams that many bytes (from the caches, or memory beyond them)."""
    x = torch.ones(max(nbytes // 4, 1))
    return lambda: x.sum()


def gemm_ceiling(dtype, max_n=2048):
    """GFLOP/s of a square matmul in PyTorch, its best run: the machine's
    practical ceiling (a median dips with whatever else the machine runs at
    that moment; a shared guest measured 123-184 GFLOP/s that way).
    Sizes double from 256 up to max_n while a call takes under 0.2 s (a CPU
    without bfloat16 arithmetic runs PyTorch's bfloat16 matmul at well under
    1 GFLOP/s, where 2048^3 would take minutes)."""
    if torch is None:
        return float("nan")
    n = 256
    while True:
        mm, f = matmul(dtype, n)
        _, best, _ = timeit({"mm": mm}, reps=10 if n == max_n else 3, warmup=1)["mm"]
        if n >= max_n or best > 200:
            return f / best / 1e6
        n *= 2


def run_case(cfg, dtype, causal, backward, reps, with_mlx, ceil_dtypes=("float32",)):
    """Times one case: ours, PyTorch's, and a GEMM ceiling per dtype of
    ceil_dtypes (a PyTorch matmul, in turns with them), and MLX's alone;
    returns its FLOP count and name -> (median, min, max) ms, or GFLOP/s
    for "ceil" (the best of ceil_dtypes' ceilings). A decoding case (Lq = 1)
    also streams as many bytes as its K and V in turns: "mem" is that rate
    times its FLOPs per byte (GFLOP/s), and "ceil" at most that."""
    name, B, H, Hk, Lq, Lk, D = cfg
    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal(s).astype(np.float32) for s in
            ((B, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D), (B, H, Lq, D))]
    mdt = getattr(mx, dtype)
    q, k, v, do = (mx.array(a).astype(mdt) for a in arrs)
    mx.eval(q, k, v, do)
    scale = 1.0 / math.sqrt(D)
    mask = "causal" if causal else None

    def mlx_sdpa(q, k, v):
        # Repeat K/V for GQA: MLX's CPU fallback handles it the same way.
        if Hk != H:
            k, v = mx.repeat(k, H // Hk, 1), mx.repeat(v, H // Hk, 1)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    def ours_fn(q, k, v):
        return fa.attention(q, k, v, scale=scale, causal=causal)

    def timed(fn):
        if not backward:
            return lambda: mx.eval(fn(q, k, v))
        # The output and the gradients from a given output gradient, like
        # PyTorch's .backward(tdo) below: a loss such as (out * do).sum()
        # would time MLX's elementwise ops too (its reference CPU code: 11%
        # of a causal 256-token bfloat16 call here, 20% in float32).
        return lambda: mx.eval(mx.vjp(fn, [q, k, v], [do]))

    f = flops(B, H, Lq, Lk, D, causal, backward)
    if f > 2e11:  # seconds per call: fewer repetitions
        reps = min(reps, 3)
    fns = {"ours": timed(ours_fn)}
    if torch is not None:
        tdt = getattr(torch, dtype)
        tq, tk, tv, tdo = (torch.from_numpy(a).to(tdt) for a in arrs)
        opts = dict(scale=scale, is_causal=causal and Lq > 1, enable_gqa=Hk != H)

        def pt():
            with torch.no_grad():
                F.scaled_dot_product_attention(tq, tk, tv, **opts)

        def pt_bwd():
            xs = [t.detach().requires_grad_(True) for t in (tq, tk, tv)]
            F.scaled_dot_product_attention(*xs, **opts).backward(tdo)

        fns["torch"] = pt_bwd if backward else pt
        # The GEMM ceilings, timed in turns with the case: the guest's
        # speed drifts by 10-30% over minutes (float32 ceilings over 36 rows
        # here: 122-201 GFLOP/s), so one ceiling measured at the start made rows
        # read anywhere from 57% to 112% of it. 1536^3 runs as fast as
        # 2048^3 (178-180 GFLOP/s here) in 40% of the time.
        mm_flop = {}
        for dt in ceil_dtypes:
            fns["ceil " + dt], mm_flop[dt] = matmul(getattr(torch, dt), 1536)
        kv_bytes = k.nbytes + v.nbytes
        if Lq == 1:
            fns["stream"] = stream_read(kv_bytes)
    results = timeit(fns, reps, warmup=1 if f > 2e11 else 2)
    if torch is not None:  # best runs, GFLOP/s
        results["ceil"] = max(mm_flop[dt] / results.pop("ceil " + dt)[1] / 1e6
                              for dt in ceil_dtypes)
        if Lq == 1:
            results["mem"] = f / results.pop("stream")[1] / 1e6
            results["ceil"] = min(results["ceil"], results["mem"])
    if with_mlx and f <= MLX_MAX_FLOP:  # 30-100x slower: 2 runs, on its own
        results.update(timeit({"mlx": timed(mlx_sdpa)}, 2, warmup=1, span=0))
    return f, results


def fmt_ratio(x, width, digits):
    """A speed-up as `width` digits and an x, or a dash where the peer was not run."""
    return f"{x:{width}.{digits}f}x" if x is not None else f"{'-':>{width + 1}s}"


def fmt_time(r):
    if r is None:
        return f"{'-':>17s}"
    med, lo, hi = r
    return f"{med:9.2f} ({hi - lo:5.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few configurations, under a minute")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-mlx", action="store_true", help="skip MLX (slow on Linux CPUs)")
    ap.add_argument("--passes", default=None,
                    help="fwd, fwd+bwd or both (default: both; --quick: fwd, plus one fwd+bwd)")
    args = ap.parse_args(argv)

    dtypes = args.dtypes.split(",")
    reps = args.reps or (3 if args.quick else 7)
    configs = QUICK if args.quick else SEED + LONG + DECODE
    causals = [True] if args.quick else [False, True]

    dev = mx.default_device()
    print(f"device: {dev} ({'Metal GPU' if dev == mx.gpu else 'CPU'}; kernel isa: {fa.cpu_isa()}), "
          f"{platform.machine()}, mlx {mx.__version__}, "
          f"torch {torch.__version__ if torch else 'not installed'}")
    if dev == mx.gpu and not fa.has_metal():
        print("note: this build has no Metal kernels; timing the CPU stream")
        mx.set_default_device(mx.cpu)
    ceilings = {dt: gemm_ceiling(getattr(torch, dt)) if torch else float("nan")
                for dt in dict.fromkeys(["float32"] + dtypes) if dt != "float16"}
    print("GEMM ceiling (PyTorch matmul, best run, n^3 up to 2048^3) at the start: " +
          ", ".join(f"{dt} {c:.0f} GFLOP/s" for dt, c in ceilings.items()))
    # A 16-bit row can always be computed in float32: its ceiling is the
    # faster of the two matmuls. PyTorch's 16-bit matmul is timed in turns
    # only where it was faster at the start (without bfloat16 arithmetic it
    # runs at ~1 GFLOP/s: seconds per 1536^3).
    fast16 = [dt for dt in dtypes if dt != "float32" and
              ceilings.get(dt, 0.0) > ceilings["float32"]]
    print("each row's ceiling: the best run of a 1536^3 matmul in float32 "
          f"{'or the row dtype (' + ', '.join(fast16) + ') ' if fast16 else ''}"
          "timed in turns with the row, the faster of the two; m: a decoding row's "
          "memory roofline, its FLOPs per byte of K and V x the GB/s of a PyTorch sum "
          "over as many bytes, timed in turns")
    print(f"times: median ms (max-min spread) over {reps} runs, or as many as span "
          f"{TIMED_S} s (up to {MAX_REPS}), ours and torch in {TURNS} turns; MLX over 2")
    head = (f"{'config':10s} {'pass':7s} {'dtype':8s} {'causal':6s} {'ours ms':>17s} {'mlx ms':>17s} "
            f"{'torch ms':>17s} {'vs mlx':>7s} {'vs torch':>8s} {'GFLOP/s':>8s} {'ceiling':>7s} "
            f"{'of ceil':>7s}")
    print(head)
    print("-" * len(head))
    passes = (args.passes or ("fwd" if args.quick else "fwd,fwd+bwd")).split(",")
    cases = [(ps, dtype, causal, cfg) for ps in passes for dtype in dtypes for causal in causals
             for cfg in configs
             # decode: causal makes no difference with Lq = 1; no backward.
             if not (cfg[4] == 1 and (causal != causals[0] or ps != "fwd"))]
    if args.quick and args.passes is None:
        cases.append(("fwd+bwd", dtypes[0], True, SEED[2]))
    speedups = {}
    for ps, dtype, causal, cfg in cases:
        f, r = run_case(cfg, dtype, causal, ps == "fwd+bwd", reps, not args.no_mlx,
                        ("float32", dtype) if dtype in fast16 else ("float32",))
        ours = r["ours"][0]
        vs = {}
        for peer in ("mlx", "torch"):
            if peer in r:
                vs[peer] = r[peer][0] / ours
                speedups.setdefault((peer, ps), []).append(vs[peer])
        gf = f / ours / 1e6
        ceil = r.get("ceil", float("nan"))
        mark = "m" if r.get("mem") == ceil else " "
        print(f"{cfg[0]:10s} {ps:7s} {dtype:8s} {str(causal and cfg[4] > 1):6s} "
              f"{fmt_time(r['ours'])} {fmt_time(r.get('mlx'))} {fmt_time(r.get('torch'))} "
              f"{fmt_ratio(vs.get('mlx'), 6, 1)} {fmt_ratio(vs.get('torch'), 7, 2)} "
              f"{gf:8.1f} {ceil:6.0f}{mark} {100 * gf / ceil:6.0f}%", flush=True)
    for (peer, ps), xs in speedups.items():
        g = math.exp(np.mean(np.log(xs)))
        print(f"{ps:7s} geometric-mean speed-up vs {peer}: {g:.2f}x "
              f"(min {min(xs):.2f}x, over {len(xs)} cases)")
    if not args.quick:
        print(memory_check())


# A fresh process measures the peak resident memory a 32k-token causal
# attention adds over its inputs and output. Linux: the peak (VmHWM) is
# reset after the inputs are made, whose generation has peaks of its own.
_MEMORY_CHILD = """
import mlx.core as mx, mlx_flash_attn as fa
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
q = mx.random.normal((1, 8, 32768, 128)); k = mx.random.normal(q.shape); v = mx.random.normal(q.shape)
out = mx.zeros(q.shape); mx.eval(q, k, v, out)
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
out = fa.attention(q, k, v, causal=True, stream=mx.cpu); mx.eval(out)
print(status("VmHWM") - base)
"""


def memory_check():
    import os
    import subprocess
    import sys

    # The child imports this same package: `python -c` puts its working
    # directory first on the path, and from the repository root that is the
    # source tree, which has no built extension.
    where = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True, text=True,
                         cwd=where)
    if res.returncode:
        return f"memory: the 32k check failed: {res.stderr.strip()[-300:]}"
    mib = float(res.stdout.strip())
    return (f"memory: 32k-token causal attention (B=1, H=8, D=128, float32) peaked "
            f"{mib:.0f} MiB above its inputs and output (target < 1024 MiB)")


if __name__ == "__main__":
    main()
