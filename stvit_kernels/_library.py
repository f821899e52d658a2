"""The fused STA primitives as ``torch.library`` custom ops in the namespace ``stvit``.

Two kernel families implement the same four primitives (DESIGN §1)::

    stvit::affinity(x, s, h, w, scale, softmax) -> A                  C++ (csrc/ops.cpp): the CPU
    stvit::aggregate(x, A, h, w) -> (num, den)                        kernels and, when built, the
    stvit::upsample(s, A, h, w) -> y                                  CUDA kernels, picked by the
    stvit::affinity_aggregate(x, s, h, w, scale) -> (A, num, den)     dispatcher from the device

    stvit::triton_affinity, triton_aggregate, triton_upsample,        Python: the Triton kernels
    triton_affinity_aggregate                                         (triton_kernels.py)

and each family has one composite, the last association step of the STA module::

    stvit::associate / stvit::triton_associate(x, s, h, w, scale) -> (stokens, A, den)

Every op allocates and returns its outputs, and gets here

* a fake implementation (``register_fake``: output shapes only), so that ``torch.compile`` and
  ``FakeTensor`` trace through it without running a kernel;
* its autograd formula (``register_autograd``), written once for both families in terms of the
  family's own forward ops (the gradients of DESIGN §1):

  - affinity: ``dlogit = A * (g - sum_k A g)`` (just ``g`` for the logits);
    ``dx = scale * upsample(s, dlogit)``, ``ds = scale * aggregate(x, dlogit).num``;
  - aggregation: ``dx = upsample(gnum, A)``, ``dA = logits(x, gnum) + gden[nbr]``;
  - upsampling: ``ds = aggregate(gy, A).num``, ``dA = logits(gy, s)``;
  - fused affinity + aggregation: the two above chained;
  - associate (``A`` and ``den`` are constants, as in the official model):
    ``dx = upsample(g / (den + 1e-12), A)``.

  So the scatter-to-super-token terms of every backward are the aggregation kernel (a gather from
  the super token's side or per-cell partials plus a fixed-order reduction: no atomics) and the
  pixel-side terms are the upsampling and logit kernels.

The reference backend needs none of this: plain autograd differentiates it, and
:func:`reference_associate` is the same composite on the reference primitives.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple

import torch

from . import reference as _ref
from ._utils import EPS, accumulation_dtype


class Prims(NamedTuple):
    """The ops of one kernel family (callables with the schemas above)."""

    affinity: Callable
    aggregate: Callable
    upsample: Callable
    affinity_aggregate: Callable
    associate: Callable


# ------------------------------------------------------------------------------------------------
# Shapes (the fake implementations)
# ------------------------------------------------------------------------------------------------

def _check_fake(*tensors):
    """What the C++ ops check first, for calls that reach a fake implementation (meta tensors,
    tracing): one device and one dtype for all inputs."""
    first = tensors[0]
    for t in tensors[1:]:
        torch._check(t.device == first.device, lambda: f"stvit ops: all tensors must be on one "
                     f"device, got {first.device} and {t.device}")
        torch._check(t.dtype == first.dtype, lambda: f"stvit ops: all tensors must have one dtype, "
                     f"got {first.dtype} and {t.dtype}")


def _fake_affinity(x, s, h, w, scale, softmax):
    _check_fake(x, s)
    return x.new_empty((x.shape[0], 9, x.shape[2], x.shape[3]))


def _fake_aggregate(x, A, h, w):
    _check_fake(x, A)
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // h, W // w)), x.new_empty((B, 1, H // h, W // w))


def _fake_upsample(s, A, h, w):
    _check_fake(s, A)
    return s.new_empty((s.shape[0], s.shape[1], A.shape[2], A.shape[3]))


def _fake_affinity_aggregate(x, s, h, w, scale):
    return (_fake_affinity(x, s, h, w, scale, True),) + _fake_aggregate(x, s, h, w)


def _fake_associate(x, s, h, w, scale):
    A, num, den = _fake_affinity_aggregate(x, s, h, w, scale)
    return num, A, den


# ------------------------------------------------------------------------------------------------
# Forward and backward formulas shared by the families (and the reference's associate)
# ------------------------------------------------------------------------------------------------

def _c(t: torch.Tensor) -> torch.Tensor:
    """The kernels take contiguous NCHW tensors (incoming gradients often are not)."""
    return t.contiguous()


def softmax_backward(A: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A * (g - sum_k A * g)`` over the 9 neighbour slots (dim 1), in at least float32."""
    acc = accumulation_dtype(A.dtype)
    A32, g32 = A.to(acc), g.to(acc)
    return (A32 * (g32 - (A32 * g32).sum(dim=1, keepdim=True))).to(A.dtype)


def associate_forward(affinity_aggregate: Callable, x, s, h, w, scale):
    """``(num / (den + 1e-12), A, den)`` from one fused pass; the division in at least float32."""
    A, num, den = affinity_aggregate(x, s, h, w, scale)
    acc = accumulation_dtype(num.dtype)
    return (num.to(acc) / (den.to(acc) + EPS)).to(num.dtype), A, den


def associate_backward(upsample: Callable, g, A, den, h, w):
    """``dx = upsample(g / (den + 1e-12), A)``: the gradient into ``x`` through ``num`` only."""
    acc = accumulation_dtype(g.dtype)
    gs = (g.to(acc) / (den.to(acc) + EPS)).to(g.dtype)
    return upsample(_c(gs), A, h, w)


def _register_formulas(qualname: Callable[[str], str], P: Prims) -> None:
    """``register_fake`` and ``register_autograd`` for the five ops of the family ``P``."""

    # affinity -----------------------------------------------------------------------------------
    def affinity_setup(ctx, inputs, output):
        x, s, h, w, scale, softmax = inputs
        ctx.save_for_backward(x, s, output if softmax else None)
        ctx.args = (h, w, scale)

    def affinity_backward(ctx, gA):
        x, s, A = ctx.saved_tensors
        h, w, scale = ctx.args
        dlogit = _c(gA if A is None else softmax_backward(A, gA))
        dx = P.upsample(_c(s), dlogit, h, w) * scale if ctx.needs_input_grad[0] else None
        ds = P.aggregate(_c(x), dlogit, h, w)[0] * scale if ctx.needs_input_grad[1] else None
        return dx, ds, None, None, None, None

    # aggregate ----------------------------------------------------------------------------------
    def aggregate_setup(ctx, inputs, output):
        x, A, h, w = inputs
        ctx.save_for_backward(x, A)
        ctx.args = (h, w)

    def aggregate_backward(ctx, gnum, gden):
        x, A = ctx.saved_tensors
        h, w = ctx.args
        dx = P.upsample(_c(gnum), _c(A), h, w) if ctx.needs_input_grad[0] else None
        dA = None
        if ctx.needs_input_grad[1]:
            dA = P.affinity(_c(x), _c(gnum), h, w, 1.0, False) + _ref.broadcast_neighbours(gden, h, w)
        return dx, dA, None, None

    # upsample -----------------------------------------------------------------------------------
    def upsample_setup(ctx, inputs, output):
        s, A, h, w = inputs
        ctx.save_for_backward(s, A)
        ctx.args = (h, w)

    def upsample_backward(ctx, gy):
        s, A = ctx.saved_tensors
        h, w = ctx.args
        gy = _c(gy)
        ds = P.aggregate(gy, _c(A), h, w)[0] if ctx.needs_input_grad[0] else None
        dA = P.affinity(gy, _c(s), h, w, 1.0, False) if ctx.needs_input_grad[1] else None
        return ds, dA, None, None

    # affinity_aggregate -------------------------------------------------------------------------
    def fused_setup(ctx, inputs, output):
        x, s, h, w, scale = inputs
        ctx.save_for_backward(x, s, output[0])
        ctx.args = (h, w, scale)

    def fused_backward(ctx, gA, gnum, gden):
        x, s, A = ctx.saved_tensors
        h, w, scale = ctx.args
        x, s, gnum = _c(x), _c(s), _c(gnum)
        # (num, den) -> (x, A), then A -> (x, s)
        gA = gA + P.affinity(x, gnum, h, w, 1.0, False) + _ref.broadcast_neighbours(gden, h, w)
        dlogit = _c(softmax_backward(A, gA))
        dx = ds = None
        if ctx.needs_input_grad[0]:
            dx = P.upsample(gnum, A, h, w) + P.upsample(s, dlogit, h, w) * scale
        if ctx.needs_input_grad[1]:
            ds = P.aggregate(x, dlogit, h, w)[0] * scale
        return dx, ds, None, None, None

    # associate ----------------------------------------------------------------------------------
    def associate_setup(ctx, inputs, output):
        _, _, h, w, _ = inputs
        _, A, den = output
        ctx.save_for_backward(A, den)
        ctx.args = (h, w)
        ctx.mark_non_differentiable(A, den)

    def associate_bwd(ctx, g, _gA, _gden):
        A, den = ctx.saved_tensors
        h, w = ctx.args
        dx = associate_backward(P.upsample, g, A, den, h, w) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None

    table = (
        ("affinity", _fake_affinity, affinity_setup, affinity_backward),
        ("aggregate", _fake_aggregate, aggregate_setup, aggregate_backward),
        ("upsample", _fake_upsample, upsample_setup, upsample_backward),
        ("affinity_aggregate", _fake_affinity_aggregate, fused_setup, fused_backward),
        ("associate", _fake_associate, associate_setup, associate_bwd),
    )
    for name, fake, setup, backward in table:
        op = qualname(name)
        torch.library.register_fake(op, fake)
        torch.library.register_autograd(op, backward, setup_context=setup)


# ------------------------------------------------------------------------------------------------
# Defining a family
# ------------------------------------------------------------------------------------------------

#: Schemas of the primitives (the C++ ones are declared with the same text in csrc/ops.cpp).
SCHEMAS = {
    "affinity": "(Tensor x, Tensor s, int h, int w, float scale, bool softmax) -> Tensor",
    "aggregate": "(Tensor x, Tensor A, int h, int w) -> (Tensor, Tensor)",
    "upsample": "(Tensor s, Tensor A, int h, int w) -> Tensor",
    "affinity_aggregate": "(Tensor x, Tensor s, int h, int w, float scale) -> (Tensor, Tensor, Tensor)",
    "associate": "(Tensor x, Tensor s, int h, int w, float scale) -> (Tensor, Tensor, Tensor)",
}


def define_family(namespace: str, prefix: str, impls: Dict[str, Callable]) -> Prims:
    """The family of ops ``{namespace}::{prefix}{name}``: defines those of ``impls`` (Python
    implementations of the four primitives; ops already defined elsewhere, e.g. in C++, are left
    out) and the composite ``associate`` on top of the family's ``affinity_aggregate``, then
    registers fake implementations and autograd formulas for all five."""
    for name, fn in impls.items():
        torch.library.custom_op(f"{namespace}::{prefix}{name}", fn, mutates_args=(),
                                schema=SCHEMAS[name])

    def op(name):
        return getattr(getattr(torch.ops, namespace), prefix + name).default

    fused = op("affinity_aggregate")
    torch.library.custom_op(
        f"{namespace}::{prefix}associate",
        lambda x, s, h, w, scale: associate_forward(fused, x, s, h, w, scale),
        mutates_args=(), schema=SCHEMAS["associate"])
    prims = Prims(*(op(name) for name in Prims._fields))
    _register_formulas(lambda name: f"{namespace}::{prefix}{name}", prims)
    return prims


_compiled_prims = None


def compiled_prims() -> Prims:
    """The C++ family (CPU and CUDA kernels of ``stvit_kernels._C``); call only once the extension
    is loaded (:func:`stvit_kernels._ext.load_error` does, right after loading it)."""
    global _compiled_prims
    if _compiled_prims is None:
        _compiled_prims = define_family("stvit", "", {})
        _register_pool("stvit::pool")
    return _compiled_prims


def _register_pool(op: str) -> None:
    """``pool(x, h, w)``: the mean of every ``h x w`` cell (``avg_pool2d``); its gradient spreads
    ``g / (h * w)`` over the cell."""

    def fake(x, h, w):
        return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // h, x.shape[3] // w))

    def setup(ctx, inputs, output):
        ctx.args = inputs[1:]

    def backward(ctx, g):
        h, w = ctx.args
        B, C, hh, ww = g.shape
        dx = (g / (h * w))[:, :, :, None, :, None].expand(B, C, hh, h, ww, w)
        return dx.reshape(B, C, hh * h, ww * w), None, None

    torch.library.register_fake(op, fake)
    torch.library.register_autograd(op, backward, setup_context=setup)


def _triton_impl(name: str) -> Callable:
    def impl(*args):
        from . import triton_kernels  # imports triton on the first call only

        return getattr(triton_kernels, name)(*args)
    return impl


#: The Triton family, ``stvit::triton_*`` (defined at import; triton is imported on the first call).
TRITON = define_family("stvit", "triton_", {name: _triton_impl(name) for name in Prims._fields[:4]})


# ------------------------------------------------------------------------------------------------
# The reference's associate: the same composite on the reference primitives, plain autograd
# ------------------------------------------------------------------------------------------------

class _ReferenceAssociate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, h, w, scale):
        stokens, A, den = associate_forward(_ref.affinity_aggregate, x, s, h, w, scale)
        ctx.save_for_backward(A, den)
        ctx.args = (h, w)
        ctx.mark_non_differentiable(A, den)
        return stokens, A, den

    @staticmethod
    def backward(ctx, g, _gA, _gden):
        A, den = ctx.saved_tensors
        h, w = ctx.args
        return associate_backward(_ref.upsample, g, A, den, h, w), None, None, None, None


def reference_associate(x, s, h, w, scale):
    """``(stokens, A, den)`` on the reference primitives, gradient into ``x`` through ``num``."""
    return _ReferenceAssociate.apply(x, s, h, w, scale)
