"""The benchmark's timing (mlx_flash_attn/bench.py): the peers of a case
take turns in blocks of runs, each block after untimed calls."""

import os
import time

from mlx_flash_attn import bench


def test_peers_take_turns(monkeypatch):
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    monkeypatch.setattr(bench, "LEAD_S", 0.0)  # one untimed call per block
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("ours", "torch")}
    times = bench.timeit(fns, reps=8, warmup=2, span=0)
    assert set(times) == {"ours", "torch"}
    runs = calls[4:]  # after two warm-up calls each
    blocks = []
    for name in runs:
        if not blocks or blocks[-1][0] != name:
            blocks.append([name, 0])
        blocks[-1][1] += 1
    # TURNS blocks each, alternating; 8 timed runs + 1 untimed call per block.
    assert [b[0] for b in blocks] == ["ours", "torch"] * bench.TURNS
    assert sum(b[1] for b in blocks if b[0] == "ours") == 8 + bench.TURNS
    assert all(med >= 0 and lo <= med <= hi for med, lo, hi in times.values())


def test_each_block_starts_with_untimed_calls_lasting_lead_s(monkeypatch):
    """The peer timed before may leave threads spinning for milliseconds:
    a block's timed runs start LEAD_S after its first untimed call."""
    monkeypatch.setattr(bench, "WARMUP_S", 0.0)
    monkeypatch.setattr(bench, "LEAD_S", 0.01)
    calls = []

    def peer(name):
        return lambda: (calls.append((name, time.perf_counter())), time.sleep(0.001))

    bench.timeit({"ours": peer("ours"), "torch": peer("torch")}, reps=4, warmup=1, span=0)
    starts = [i for i in range(3, len(calls)) if calls[i][0] != calls[i - 1][0]] + [len(calls)]
    blocks = [calls[a:b] for a, b in zip([2] + starts[:-1], starts)]  # after the warm-ups
    assert len(blocks) == 2 * bench.TURNS
    for block in blocks:  # 1 timed run, after untimed calls spanning LEAD_S
        assert len(block) >= 3 and block[-1][1] - block[0][1] >= 0.01


def test_a_slow_peer_is_timed_once(monkeypatch):
    monkeypatch.setattr(bench, "SLOW_CALL_S", 0.0)  # every call counts as slow,
    monkeypatch.setattr(bench, "SHORT_CALL_S", 0.0)  # and none as short
    calls = []
    times = bench.timeit({"slow": lambda: calls.append(1)}, reps=5, warmup=2, span=10)
    assert len(calls) == 2  # one warm-up call, one timed
    assert times["slow"][1] == times["slow"][2]


def test_a_16_bit_case_keeps_the_faster_ceiling(monkeypatch):
    """A bfloat16 case given both dtypes times a matmul in each, in turns
    with the peers, and keeps the faster: here the bfloat16 one, made to
    claim a billion times its FLOPs (a millionfold claim read under 1e5
    while compilers ran beside: a 64^3 call on 2 threads took 24 ms)."""
    timed = []
    real = bench.matmul

    def matmul(dtype, n):
        mm, f = real(dtype, 64)
        claimed = f * (1e9 if dtype == bench.torch.bfloat16 else 1)
        return (lambda: (timed.append(dtype), mm())), claimed

    monkeypatch.setattr(bench, "matmul", matmul)
    case = (("tiny", 1, 2, 1, 16, 16, 32), "bfloat16", False, False, 1, False)
    _, r = bench.run_case(*case, ("float32",))
    assert set(timed) == {bench.torch.float32} and r["ceil"] < 1e5
    _, r = bench.run_case(*case, ("float32", "bfloat16"))
    assert set(timed) == {bench.torch.float32, bench.torch.bfloat16} and r["ceil"] > 1e5
    assert set(r) == {"ours", "torch", "ceil"}


def test_each_case_times_a_ceiling():
    """A case times the float32 GEMM ceiling in turns with the peers and
    returns it as GFLOP/s (the row's 'of ceil' is against it)."""
    f, r = bench.run_case(("tiny", 1, 2, 1, 16, 16, 32), "float32", True, False, 1, False)
    assert set(r) == {"ours", "torch", "ceil"}
    assert f == bench.flops(1, 2, 16, 16, 32, True)
    assert isinstance(r["ceil"], float) and 0.1 < r["ceil"] < 1e5


def test_a_decoding_case_gets_a_memory_roofline(monkeypatch):
    """A decoding case (Lq = 1) also times a PyTorch sum over as many bytes
    as its K and V, in turns with the peers; its ceiling is the lower of the
    GEMM ceiling and that GB/s times its FLOPs per byte. Here the sum is
    made slow (10 ms per call), so the memory side is the lower."""
    calls = []
    real = bench.stream_read

    def stream_read(nbytes):
        calls.append(nbytes)
        fn = real(nbytes)
        return lambda: (time.sleep(0.01), fn())

    monkeypatch.setattr(bench, "stream_read", stream_read)
    cfg = ("dec", 1, 4, 2, 1, 300, 32)
    f, r = bench.run_case(cfg, "bfloat16", False, False, 1, False)
    kv_bytes = 2 * 2 * 300 * 32 * 2
    assert calls == [kv_bytes] and set(r) == {"ours", "torch", "ceil", "mem"}
    assert 0.0 < r["mem"] < f / 10e-3 / 1e9  # the FLOPs over calls of 10 ms or more
    assert r["ceil"] == r["mem"]
    _, r = bench.run_case(("tiny", 1, 2, 1, 16, 16, 32), "float32", False, False, 1, False)
    assert "mem" not in r and len(calls) == 1


def test_a_peer_not_run_prints_a_dash():
    assert bench.fmt_ratio(None, 6, 1) == "      -"
    assert bench.fmt_ratio(2.5, 6, 1) == "   2.5x"
    assert len(bench.fmt_ratio(None, 7, 2)) == len(bench.fmt_ratio(1.0, 7, 2))


def test_the_memory_check_imports_the_package_the_benchmark_runs(monkeypatch):
    """The README runs the benchmark from the repository root, where a
    `python -c` child would import the source tree (no built extension):
    the child must import the package this process imported. This child
    prints 0 (MiB, as memory_check reports it) only if it did."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    init = os.path.join(os.path.dirname(bench.__file__), "__init__.py")
    monkeypatch.setattr(bench, "_MEMORY_CHILD", "import mlx_flash_attn as fa\n"
                        f"print(0 if fa.__file__ == {init!r} else 1)")
    assert "peaked 0 MiB above" in bench.memory_check()
