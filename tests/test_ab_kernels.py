"""benchmarks/ab_kernels.sh builds the CPU kernels of two revisions into one
binary and times them against each other: here HEAD against the working
tree, which must build, run both passes (on one thread and on two, and a
decode: one query row, 2 K/V heads for 4 query heads) and agree with
itself."""

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("g++") is None,
                    reason="needs the git checkout and g++")
@pytest.mark.skipif(subprocess.run(["grep", "-q", "avx2", "/proc/cpuinfo"]).returncode != 0,
                    reason="the tool builds the AVX2 kernels by default")
@pytest.mark.parametrize("bwd,threads,gqa", [("0", "1", []), ("1", "1", []), ("1", "2", []),
                                             ("0", "2", ["2", "1"])],
                         ids=["forward", "backward", "backward-2-threads", "decode-gqa"])
def test_ab_kernels_runs(bwd, threads, gqa):
    out = subprocess.run(
        [str(ROOT / "benchmarks/ab_kernels.sh"), "HEAD", "--", "2", "4", "300", "64", "1", "0", "2",
         bwd, threads, *gqa], capture_output=True, text=True, timeout=300, check=True).stdout
    m = re.search(r"B/A ([\d.]+) \| max \|A-B\| ([\d.e+-]+)", out)
    assert m, out
    assert float(m.group(1)) > 0
    assert float(m.group(2)) < 1e-5, out  # uncommitted edits may change rounding only
