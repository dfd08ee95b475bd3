"""The CPU kernels' copies of K, V, Q and dO (a wave of heads at a time,
kernel_common.h's wave_buffer) go into a buffer the calling thread keeps from
call to call: calls after the first fault in no new pages for them. Checked
in a child process whose C library maps every allocation of 128 KiB or more
afresh (MALLOC_MMAP_THRESHOLD_, Linux/glibc), so a buffer allocated per call
would fault in all of its pages on every call."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the child's reference gradients

TESTS = Path(__file__).parent

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="needs glibc's MALLOC_MMAP_THRESHOLD_")

# 8 heads of 384 tokens at D 128 in float32: the backward's copies of a K/V
# head and its query head (1.1 MiB) are more than a thread copies for
# itself (kOwnHeadBytes), so all 8 go into one wave's buffer (9 MiB).
# Reports the minor page faults of each call after the first two, and the
# bytes of the arrays a call returns (the limit allows for those, which
# MLX may map afresh, and for the kernels' per-task dQ buffers: 196 KiB a
# head).
CHILD = r"""
import json, resource
import numpy as np
import mlx.core as mx
import mlx_flash_attn as fa
from reference import assert_grad_close, rand, reference_grads, to64
rng = np.random.default_rng(0)
q, k, v, do = (rand(rng, (1, 8, 384, 128), mx.float32) for _ in range(4))
mx.eval(q, k, v, do)
f = lambda q, k, v: fa.attention(q, k, v, causal=True)
faults = []
for i in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out, grads = mx.vjp(f, [q, k, v], [do])
    mx.eval(out, grads)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
ref = reference_grads(q, k, v, do, mx.zeros((1, 8, 384)), causal=True)
for name, g in zip("qkv", grads):
    assert_grad_close(to64(g), ref[name], mx.float32, "d" + name)
arrays = out[0].nbytes + sum(g.nbytes for g in grads)
print(json.dumps({"faults": faults[2:], "array_bytes": arrays}))
"""


def test_copies_not_faulted_in_per_call():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         cwd=TESTS)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    page = os.sysconf("SC_PAGE_SIZE")
    # The call's own arrays, the dQ buffers (8 x 196 KiB) and 1 MiB to spare;
    # copies allocated per call would add about 9 MiB more.
    limit = (r["array_bytes"] + 8 * 196 * 1024 + (1 << 20)) // page
    assert max(r["faults"]) < limit, (r, limit)
