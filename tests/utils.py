"""Shared test material: the explicit shape list, input makers and tolerances."""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import stvit_kernels as sk

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


def autograd_node_names(fn) -> set:
    """Names of the autograd nodes reachable from ``fn`` (a ``grad_fn``): ``name()`` without
    ``torch::autograd::`` (``AccumulateGrad``, ``CppNode<stvit::SuperTokenStep>``)."""
    names, todo, seen = set(), [fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        try:
            name = f.name().removeprefix("torch::autograd::")
        except RuntimeError:  # torch 2.11: a Python Function's node has no name()
            name = type(f).__name__
        names.add(name)
        try:
            todo += [n for n, _ in f.next_functions]
        except RuntimeError:  # torch 2.11: not readable on a custom Function's node
            pass
    return names


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

def rel_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    """The relative L2 error of ``a`` against a float64 ``truth``, over the whole tensor (the
    accuracy rule's measure, see test_autocast.py)."""
    return ((a.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


LONG = os.environ.get("STVIT_LONG_TESTS", "0") not in ("", "0")


def device_for(backend):
    """The device a backend's tests run on: CUDA for ``cuda``, and for ``triton`` when there is a
    GPU (else the Triton interpreter on the CPU), the CPU for the others. ``None`` (auto) and
    ``reference`` run on the CPU. Every test picks its device here."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def other_device(backend):
    """A device that is not ``device_for(backend)``: the CPU for a GPU backend, else a GPU when there
    is one, else PyTorch's shape-only 'meta' device."""
    if device_for(backend) == "cuda":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "meta"


def op_results(op, backend, t, size, dtype=None, scale=None, n_iter=1):
    """One public op on the inputs ``t`` of :func:`make_inputs` (cast to ``dtype`` if given): its
    outputs and the gradients of all its differentiable inputs for the incoming gradients of ``t``
    (aggregate: through num and den; associate: into x through the super tokens), by name, detached.
    ``op`` is "affinity", "aggregate", "upsample" or "associate" (which starts from ``t["s"]``)."""
    dtype = dtype or t["x"].dtype
    x, s, A = (t[k].detach().to(dtype).requires_grad_() for k in ("x", "s", "A"))
    g = {k: t[k].to(dtype) for k in ("gA", "gy", "gnum", "gden")}
    if op == "affinity":
        out = sk.stoken_affinity(x, s, size, scale, backend=backend)
        res = {"affinity": out}
        res["affinity.dx"], res["affinity.ds"] = torch.autograd.grad(out, (x, s), g["gA"])
    elif op == "aggregate":
        num, den = sk.stoken_aggregate(x, A, size, backend=backend)
        res = {"aggregate.num": num, "aggregate.den": den}
        res["aggregate.dx"], res["aggregate.dA"] = torch.autograd.grad(
            (num, den), (x, A), (g["gnum"], g["gden"]))
    elif op == "upsample":
        y = sk.stoken_upsample(s, A, size, backend=backend)
        res = {"upsample": y}
        res["upsample.ds"], res["upsample.dA"] = torch.autograd.grad(y, (s, A), g["gy"])
    elif op == "associate":
        stokens, A1 = sk.associate(x, s.detach(), size, n_iter, scale, backend=backend)
        res = {"associate.stokens": stokens, "associate.A": A1}
        res["associate.dx"], = torch.autograd.grad(stokens, x, g["gnum"])
    else:
        raise ValueError(f"unknown op {op!r}")
    return {k: v.detach() for k, v in res.items()}
