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


def test_smem_wavefront_model():
    """csrc/cuda/emu/smem_wavefronts.py, the model behind the aggregating kernels' shared-memory
    layout (sta_kernels.cuh: fetch_pixel's rotation, cell units, a_row): at STViT-S stage 1 in
    float32, copies of x in channel order are 4-way bank-conflicted and the rotated ones take one
    wavefront per 128 bytes; cell units read fewer wavefronts than column units, the weights as
    pixel rows fewer than as 9 scalars."""
    import importlib.util
    path = os.path.join(ROOT, "csrc", "cuda", "emu", "smem_wavefronts.py")
    spec = importlib.util.spec_from_file_location("smem_wavefronts", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    C, h, w, ww, NC, BS, XC, SK, CW, sc, xs, ac = model.STAGES["stage1 float32"]
    in_order, _ = model.count(C, h, w, ww, NC, BS, XC, SK, CW, sc, xs, ac, rotate=False)
    rotated, batches = model.count(C, h, w, ww, NC, BS, XC, SK, CW, sc, xs, ac, rotate=True)
    pixels = h * w * NC / batches                    # per batch, on average
    one_per_128_bytes = C * pixels * xs / 128
    assert rotated["fetch"] == one_per_128_bytes
    assert in_order["fetch"] == 4 * one_per_128_bytes
    assert rotated["phase2 cells, A rows"] < rotated["phase2 cells"] < rotated["phase2 columns"]
