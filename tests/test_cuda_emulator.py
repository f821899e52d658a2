"""The CUDA kernels' own code (csrc/cuda/*.cuh), compiled for the CPU under the block/thread
emulator of csrc/cuda/emu and compared with the reference: the CUDA index math, barriers and
partial-sum bookkeeping are checked on every CI run, GPU or not. Threads run one at a time in
shuffled orders between barriers and fresh buffers are NaN-poisoned, so a missing barrier or an
unwritten element fails. The quick mode (production launch limits) runs here; the full sweep of
launch configurations runs with STVIT_LONG_TESTS=1."""
import os
import subprocess
import sys

import pytest

from .utils import LONG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "csrc", "cuda", "emu", "run_emu.py")


@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="no CUDA emulator sources")
def test_cuda_kernels_under_emulator():
    env = dict(os.environ)
    if not LONG:
        env["QUICK"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3000)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "cases passed" in out, out[-4000:]
