"""The GPU tier's selection (``make test-gpu``, tests/conftest.py): every test that puts something
on the GPU, and nothing else. Checked here by collecting under ``STVIT_GPU_TIER=dry-run``, where
the GPU parameter values are the Triton interpreter's (``triton``)."""
import os
import subprocess
import sys

import pytest

import stvit_kernels as sk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collect(*files, tier):
    env = dict(os.environ, STVIT_GPU_TIER=tier)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


@pytest.mark.skipif("triton" not in sk.available_backends(), reason="needs the triton backend")
def test_gpu_tier_selects_the_gpu_tests():
    files = ("tests/test_errors.py", "tests/test_reference.py", "tests/test_cuda_graphs.py")
    everything = _collect(*files, tier="0")
    tier = _collect(*files, tier="dry-run")
    assert tier and tier < everything
    # parametrised with a GPU backend: in; CUDA-only files (marked cuda): in; the rest: out
    assert all("triton" in t or "test_cuda_graphs.py" in t for t in tier), sorted(tier)[:5]
    assert {t for t in everything if "[triton" in t or "-triton" in t} <= tier
    assert not any("test_reference.py" in t for t in tier)
