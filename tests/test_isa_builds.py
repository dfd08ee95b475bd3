"""Every CPU kernel build this machine can run (generic, AVX2, AVX-512 and
AVX-512 with AMX), chosen through MLX_FLASH_ATTN_ISA in a fresh process and
checked against the float64 references by a slice of the forward and
backward tests. The default run only exercises the best build."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ISAS = ["generic", "avx2", "avx512", "avx512-amx"]


def isa_in_child(isa):
    env = dict(os.environ, MLX_FLASH_ATTN_ISA=isa)
    # cwd: not the repository root, whose source folder would shadow the
    # installed package.
    out = subprocess.run([sys.executable, "-c", "import mlx_flash_attn as f; print(f.cpu_isa())"],
                         env=env, capture_output=True, text=True, check=True, cwd=TESTS)
    return out.stdout.strip()


@pytest.mark.parametrize("isa", ISAS)
def test_build_against_reference(isa):
    if isa_in_child(isa) != isa:
        pytest.skip(f"this CPU cannot run the {isa} build")
    env = dict(os.environ, MLX_FLASH_ATTN_ISA=isa)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(TESTS / "test_forward.py"), str(TESTS / "test_backward.py"),
         "-k", "head_dims or combined or lengths or decode"],
        env=env, capture_output=True, text=True, cwd=TESTS)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
