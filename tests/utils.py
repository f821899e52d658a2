"""Shared test material: the explicit shape list, input makers and tolerances."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

# (B, C, H, W, h, w): H, W multiples of (h, w), as the op-level functions require.
OP_SHAPES = [
    pytest.param(2, 16, 16, 16, 8, 8, id="B2-C16-16x16-s8-grid2x2"),
    pytest.param(1, 3, 9, 15, 3, 5, id="B1-C3-9x15-s3x5-odd"),
    pytest.param(2, 5, 8, 8, 8, 8, id="B2-C5-8x8-s8-grid1x1"),
    pytest.param(1, 1, 12, 8, 4, 4, id="B1-C1-12x8-s4"),
    pytest.param(3, 13, 14, 21, 7, 3, id="B3-C13-14x21-s7x3"),
    pytest.param(2, 8, 8, 16, 8, 8, id="B2-C8-8x16-s8-grid1x2"),
    pytest.param(1, 20, 28, 28, 4, 4, id="B1-C20-28x28-s4-grid7x7"),
    pytest.param(2, 9, 6, 10, 1, 2, id="B2-C9-6x10-s1x2"),
    pytest.param(1, 7, 10, 10, 2, 2, id="B1-C7-10x10-s2-grid5x5"),
]

# Tiny shapes for float64 gradcheck.
GRAD_SHAPES = [
    pytest.param(1, 3, 6, 6, 2, 3, id="B1-C3-6x6-s2x3"),
    pytest.param(2, 2, 4, 4, 4, 4, id="B2-C2-4x4-s4-grid1x1"),
    pytest.param(1, 4, 3, 10, 3, 5, id="B1-C4-3x10-s3x5-grid1x2"),
]


def seed_for(*key) -> int:
    """A fresh but reproducible seed per test case."""
    return zlib.crc32(repr(("stvit", *key)).encode()) % (2**31)


def make_inputs(B, C, H, W, h, w, dtype=torch.float32, device="cpu", seed=0):
    """x [B, C, H, W], s [B, C, H/h, W/w], a valid association A [B, 9, H, W] and gradients."""
    g = torch.Generator().manual_seed(seed)
    hh, ww = H // h, W // w

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    x = rnd(B, C, H, W)
    s = rnd(B, C, hh, ww)
    A = rnd(B, 9, H, W).softmax(1).to(dtype)
    return dict(x=x, s=s, A=A, gA=rnd(B, 9, H, W), gy=rnd(B, C, H, W),
                gnum=rnd(B, C, hh, ww), gden=rnd(B, 1, hh, ww))


# Tolerances against the reference, by dtype (the kernels accumulate in float32 or better).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}

LONG = os.environ.get("STVIT_LONG_TESTS", "0") not in ("", "0")
