"""The CPU kernels' thread pool (cpp/cpu/runtime.cpp), checked from child
processes whose CPU affinity is set before the extension loads: the pool is
sized to the cores the process may use, and its workers are kept off the
core of the thread that hands them work (Linux only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                                reason="no CPU affinity on this platform")

# A child restricted to `cpus` runs a few calls, checks the output against
# the reference and reports the threads the calls started (the pool's
# workers: MLX's own exist after its first eval) with their affinity.
CHILD = r"""
import os, sys, json
os.sched_setaffinity(0, set(json.loads(sys.argv[1])))
import numpy as np
import mlx.core as mx
import mlx_flash_attn as fa
from reference import assert_close, rand, reference
rng = np.random.default_rng(0)
q, k, v = (rand(rng, (1, 4, 200, 64), mx.float32) for _ in range(3))
mx.eval(q, k, v, q + 1)  # q + 1: MLX starts its CPU stream's thread
before = set(os.listdir("/proc/self/task"))
for _ in range(3):
    out = fa.attention(q, k, v, causal=True)
    mx.eval(out)
new = sorted(set(os.listdir("/proc/self/task")) - before)
assert_close(out, reference(q, k, v, causal=True)[0], mx.float32)
print(json.dumps([sorted(os.sched_getaffinity(int(t))) for t in new]))
"""


def run_child(cpus):
    env = {k: v for k, v in os.environ.items() if k != "MLX_FLASH_ATTN_NUM_THREADS"}
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sorted(cpus))], env=env,
                         capture_output=True, text=True, cwd=TESTS)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def allowed():
    return sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize("ncpus", [1, 2, 3])
def test_pool_sized_to_allowed_cores(ncpus):
    cpus = allowed()[:ncpus]
    if len(cpus) < ncpus:
        pytest.skip(f"needs {ncpus} CPUs")
    assert len(run_child(cpus)) == ncpus - 1  # the calling thread works too


def test_workers_kept_off_one_core():
    cpus = allowed()[:2]
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    workers = run_child(cpus)
    # A worker may run on every allowed core but the one its caller was on:
    # with two cores, the other one.
    assert len(workers) == 1
    assert len(workers[0]) == 1 and workers[0][0] in cpus
