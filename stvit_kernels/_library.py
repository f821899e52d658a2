"""The fused STA kernels as torch operators, and the autograd around them.

Two kernel families implement the same raw (non-differentiable) operators (DESIGN §1)::

    stvit::affinity(x, s, h, w, scale, softmax) -> A                      C++ (csrc/ops.cpp): the
    stvit::aggregate(x, A, h, w) -> (num, den)                            CPU kernels and, when
    stvit::upsample(s, A, h, w) -> y                                      built, the CUDA kernels,
    stvit::affinity_aggregate(x, s, h, w, scale) -> (A, num, den)         picked by the dispatcher
    stvit::pool(x, h, w) -> s                                             from the tensors' device
    stvit::associate(x, s?, h, w, scale, n_iter) -> (stokens, A, den)
    stvit::associate_backward(g, A, den, h, w) -> dx

    stvit::triton_affinity, triton_aggregate, triton_upsample,          Python (triton_kernels.py),
    triton_affinity_aggregate, triton_pool, triton_associate,           CUDA tensors only (and CPU
    triton_associate_backward                                           ones under the interpreter)

``associate`` is the whole association stage of the STA module in one call: the initial super
tokens (``avg_pool2d`` of ``x`` when ``s`` is None), ``n_iter`` fused affinity + aggregation passes
whose reductions write ``num / (den + 1e-12)`` directly, and the final ``(stokens, A, den)``.
``associate_backward`` is its gradient into ``x``: ``upsample(g / (den + 1e-12), A)``.

The operators are declared with ``define`` + ``impl`` (C++ ``TORCH_LIBRARY`` or
``torch.library.Library``) and a fake implementation (``register_fake``) for ``torch.compile``, but
no autograd kernel: calling one from Python costs one dispatcher round trip. The autograd lives one
level up, in one ``torch.autograd.Function`` per public op or module step (:class:`Affinity`,
:class:`Aggregate`, :class:`Upsample`, :class:`AffinityAggregate`, :class:`Associate`, and
:class:`Refine` for the refine attention), written once
for every family in terms of the family's own raw operators (:class:`Kernels`), so that

* affinity: ``dlogit = A * (g - sum_k A g)`` (just ``g`` for the logits);
  ``dx = scale * upsample(s, dlogit)``, ``ds = scale * aggregate(x, dlogit).num``;
* aggregation: ``dx = upsample(gnum, A)``, ``dA = logits(x, gnum) + gden[nbr]``;
* upsampling: ``ds = aggregate(gy, A).num``, ``dA = logits(gy, s)``;
* fused affinity + aggregation: the two above chained;
* associate (``A`` and ``den`` are constants, as in the official model):
  ``dx = associate_backward(g, A, den)``.

The scatter-to-super-token terms of every backward are the aggregation kernel (per-cell partials
and a fixed-order reduction: no atomics) and the pixel-side terms the upsampling and logit kernels.
A Function is only entered when a gradient is needed (:func:`needs_grad`); otherwise the raw
operator is called directly. Measured on this project's CPU machine (``benchmarks/host_overhead.py``),
over the ATen op it wraps: an operator declared with ``define`` + ``impl`` costs ~3.5 µs per call
from Python, the same operator as ``torch.library.custom_op`` ~11 µs, ~22 µs with
``register_autograd`` and an input that requires grad; ``autograd.Function.apply`` around the
``define`` + ``impl`` operator ~9 µs.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import reference as _ref
from ._utils import accumulation_dtype, autocast_cast_dtype, cast, normalise


class Kernels(NamedTuple):
    """The raw (non-differentiable) operators of one kernel family. Tensors of one dtype and one
    device, in any layout, already checked by the public functions."""

    name: str
    affinity: Callable            # (x, s, h, w, scale, softmax) -> A
    aggregate: Callable           # (x, A, h, w) -> (num, den)
    upsample: Callable            # (s, A, h, w) -> y
    affinity_aggregate: Callable  # (x, s, h, w, scale) -> (A, num, den)
    pool: Callable                # (x, h, w) -> s, the mean of every cell
    associate: Callable           # (x, s or None, h, w, scale, n_iter) -> (stokens, A, den)
    associate_backward: Callable  # (g, A, den, h, w) -> dx


#: Kernel families by name (the autograd Functions take the name, a constant under torch.compile).
_FAMILIES: Dict[str, Kernels] = {}


def register_family(kernels: Kernels) -> Kernels:
    _FAMILIES[kernels.name] = kernels
    return kernels


def family(name: str) -> Kernels:
    return _FAMILIES[name]


# ------------------------------------------------------------------------------------------------
# Shared formulas
# ------------------------------------------------------------------------------------------------

def softmax_backward(A: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A * (g - sum_k A * g)`` over the 9 neighbour slots (dim 1), in at least float32."""
    acc = accumulation_dtype(A.dtype)
    A32, g32 = cast(A, acc), cast(g, acc)
    return cast(A32 * (g32 - (A32 * g32).sum(dim=1, keepdim=True)), A.dtype)


def needs_grad(*tensors) -> bool:
    """Whether autograd must record a call with these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def composite_associate(affinity_aggregate: Callable, pool: Callable) -> Callable:
    """``associate`` from a family's fused pass (for the families without a native one)."""

    def associate(x, s, h, w, scale, n_iter):
        s = pool(x, h, w) if s is None else s
        for _ in range(n_iter - 1):
            _, num, den = affinity_aggregate(x, s, h, w, scale)
            s = normalise(num, den)
        A, num, den = affinity_aggregate(x, s, h, w, scale)
        return normalise(num, den), A, den
    return associate


def composite_associate_backward(upsample: Callable) -> Callable:
    def associate_backward(g, A, den, h, w):
        return upsample(normalise(g, den), A, h, w)
    return associate_backward


# ------------------------------------------------------------------------------------------------
# Autograd: one Function per public op / module step, for every family
# ------------------------------------------------------------------------------------------------

def _sum(*terms):
    """The sum of the terms that are not None (None if all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


# The Functions do not materialise the gradients of unused outputs (``set_materialize_grads(False)``):
# a None gradient skips its terms instead of costing a kernel on a tensor of zeros.

class Affinity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fam, x, s, h, w, scale, softmax):
        ctx.set_materialize_grads(False)
        A = family(fam).affinity(x, s, h, w, scale, softmax)
        ctx.save_for_backward(x, s, A if softmax else None)
        ctx.args = (fam, h, w, scale)
        return A

    @staticmethod
    def backward(ctx, gA):
        if gA is None:
            return (None,) * 7
        x, s, A = ctx.saved_tensors
        fam, h, w, scale = ctx.args
        K = family(fam)
        dlogit = gA if A is None else softmax_backward(A, gA)
        dx = K.upsample(s, dlogit, h, w) * scale if ctx.needs_input_grad[1] else None
        ds = K.aggregate(x, dlogit, h, w)[0] * scale if ctx.needs_input_grad[2] else None
        return None, dx, ds, None, None, None, None


class Aggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fam, x, A, h, w):
        ctx.set_materialize_grads(False)
        num, den = family(fam).aggregate(x, A, h, w)
        ctx.save_for_backward(x, A)
        ctx.args = (fam, h, w)
        return num, den

    @staticmethod
    def backward(ctx, gnum, gden):
        x, A = ctx.saved_tensors
        fam, h, w = ctx.args
        K = family(fam)
        dx = dA = None
        if ctx.needs_input_grad[1] and gnum is not None:
            dx = K.upsample(gnum, A, h, w)
        if ctx.needs_input_grad[2]:
            dA = _sum(None if gnum is None else K.affinity(x, gnum, h, w, 1.0, False),
                      None if gden is None else _ref.broadcast_neighbours(gden, h, w))
        return None, dx, dA, None, None


class Upsample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fam, s, A, h, w):
        ctx.set_materialize_grads(False)
        y = family(fam).upsample(s, A, h, w)
        ctx.save_for_backward(s, A)
        ctx.args = (fam, h, w)
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return (None,) * 5
        s, A = ctx.saved_tensors
        fam, h, w = ctx.args
        K = family(fam)
        ds = K.aggregate(gy, A, h, w)[0] if ctx.needs_input_grad[1] else None
        dA = K.affinity(gy, s, h, w, 1.0, False) if ctx.needs_input_grad[2] else None
        return None, ds, dA, None, None


class AffinityAggregate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fam, x, s, h, w, scale):
        ctx.set_materialize_grads(False)
        A, num, den = family(fam).affinity_aggregate(x, s, h, w, scale)
        ctx.save_for_backward(x, s, A)
        ctx.args = (fam, h, w, scale)
        return A, num, den

    @staticmethod
    def backward(ctx, gA, gnum, gden):
        x, s, A = ctx.saved_tensors
        fam, h, w, scale = ctx.args
        K = family(fam)
        # (num, den) -> (x, A), then A -> (x, s)
        gA = _sum(gA, None if gnum is None else K.affinity(x, gnum, h, w, 1.0, False),
                  None if gden is None else _ref.broadcast_neighbours(gden, h, w))
        dlogit = None if gA is None else softmax_backward(A, gA)
        dx = ds = None
        if ctx.needs_input_grad[1]:
            dx = _sum(None if gnum is None else K.upsample(gnum, A, h, w),
                      None if dlogit is None else K.upsample(s, dlogit, h, w) * scale)
        if ctx.needs_input_grad[2] and dlogit is not None:
            ds = K.aggregate(x, dlogit, h, w)[0] * scale
        return None, dx, ds, None, None, None


class Associate(torch.autograd.Function):
    """``(stokens, A)`` of the association stage; the gradient flows into ``x`` through the final
    ``num`` only (``A`` and ``den`` are constants, ``s`` gets none), as in the official model."""

    @staticmethod
    def forward(ctx, fam, x, s, h, w, scale, n_iter):
        ctx.set_materialize_grads(False)
        stokens, A, den = family(fam).associate(x, s, h, w, scale, n_iter)
        ctx.save_for_backward(A, den)
        ctx.args = (fam, h, w)
        ctx.mark_non_differentiable(A)
        return stokens, A

    @staticmethod
    def backward(ctx, g, _gA):
        if g is None or not ctx.needs_input_grad[1]:
            return (None,) * 7
        A, den = ctx.saved_tensors
        fam, h, w = ctx.args
        return None, family(fam).associate_backward(g, A, den, h, w), None, None, None, None, None


def _drop_absent_biases(grads, has_qkv_bias: bool, has_proj_bias: bool) -> tuple:
    """``(d_input, dqkv_weight, dqkv_bias, dproj_weight, dproj_bias)`` of the refine operators
    (which always compute both bias gradients), None for a bias the module does not have."""
    d_input, dqkv_w, dqkv_b, dproj_w, dproj_b = grads
    return (d_input, dqkv_w, dqkv_b if has_qkv_bias else None, dproj_w,
            dproj_b if has_proj_bias else None)


class Refine(torch.autograd.Function):
    """The refine attention of the STA module as one autograd node: the forward
    ``stvit::refine_attention_forward`` (qkv projection, softmax attention in the accumulation type,
    proj) returns its intermediates and ``stvit::refine_attention_backward`` differentiates it by
    hand (csrc/refine.cpp). The composite ``stvit::refine_attention`` (SDPA) would put ~20 nodes of
    views, matmuls and SDPA on autograd's graph, each a dispatcher round trip in the backward."""

    @staticmethod
    def forward(ctx, s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, dtype=None):
        ctx.set_materialize_grads(False)
        out, qkvh, attn, o = torch.ops.stvit.refine_attention_forward.default(
            s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, dtype)
        ctx.save_for_backward(s, qkvh, attn, o, qkv_weight, proj_weight)
        ctx.args = (heads, scale, qkv_bias is not None, proj_bias is not None)
        return out

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return (None,) * 8
        heads, scale, *biases = ctx.args
        grads = torch.ops.stvit.refine_attention_backward.default(g, *ctx.saved_tensors, heads, scale)
        return _drop_absent_biases(grads, *biases) + (None,) * 3


def family_step_forward(K: Kernels, x, params, h, w, scale, n_iter, heads, attn_scale, dtype=None):
    """The STA module with its written-out refine on a family's kernels: ``(y, A, den, the refine's
    saved tensors)``. ``dtype``: the autocast dtype, or None; then ``x`` is cast as autocast would
    (:func:`autocast_cast_dtype`) and the refine casts its parameters itself."""
    x = cast(x, autocast_cast_dtype(x, dtype))
    s, A, den = K.associate(x, None, h, w, scale, n_iter)
    out, qkvh, attn, o = torch.ops.stvit.refine_attention_forward.default(s, *params, heads,
                                                                          attn_scale, dtype)
    return K.upsample(cast(out, A.dtype), A, h, w), A, den, (s, qkvh, attn, o)


class FamilyStep(torch.autograd.Function):
    """The module step of ``stvit::sta`` (one C++ autograd node, csrc/ops.cpp) for a family without
    a C++ ``sta_forward`` (the Triton kernels), in Python: the family's ``associate``,
    ``stvit::refine_attention_forward``, the family's ``upsample``
    (:func:`family_step_forward`), as one autograd node, autocast's cast of ``x`` included; the
    backward is the same pieces' gradients (the aggregation of the output gradient into the super
    tokens, ``stvit::refine_attention_backward``, ``associate_backward``, then the cast back into
    ``x``'s dtype), without the nodes and Function calls between them."""

    @staticmethod
    def forward(ctx, fam, x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale, n_iter,
                heads, attn_scale, dtype=None):
        ctx.set_materialize_grads(False)
        params = (qkv_weight, qkv_bias, proj_weight, proj_bias)
        y, A, den, refine_saved = family_step_forward(family(fam), x, params, h, w, scale, n_iter,
                                                      heads, attn_scale, dtype)
        ctx.save_for_backward(A, den, *refine_saved, qkv_weight, proj_weight)
        ctx.args = (fam, h, w, heads, attn_scale, x.dtype, qkv_bias is not None,
                    proj_bias is not None)
        return y

    @staticmethod
    def backward(ctx, gy):
        if gy is None:
            return (None,) * 13
        fam, h, w, heads, attn_scale, x_dtype, *biases = ctx.args
        A, den, *refine_saved = ctx.saved_tensors
        K = family(fam)
        g_out = K.aggregate(gy, A, h, w)[0]  # gy is in y's dtype, A's
        grads = torch.ops.stvit.refine_attention_backward.default(g_out, *refine_saved, heads,
                                                                  attn_scale)
        d_s, *d_params = _drop_absent_biases(grads, *biases)
        dx = None
        if ctx.needs_input_grad[1]:
            dx = cast(K.associate_backward(d_s, A, den, h, w), x_dtype)
        return (None, dx, *d_params) + (None,) * 7


# ------------------------------------------------------------------------------------------------
# Fake implementations (output shapes only) for torch.compile / FakeTensor / meta tensors
# ------------------------------------------------------------------------------------------------

def _check_fake(*tensors):
    """What the kernels check first, for calls that reach a fake implementation (meta tensors,
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


def _fake_pool(x, h, w):
    return x.new_empty((x.shape[0], x.shape[1], x.shape[2] // h, x.shape[3] // w))


def _fake_aggregate(x, A, h, w):
    _check_fake(x, A)
    B, C, H, W = x.shape
    return x.new_empty((B, C, H // h, W // w)), x.new_empty((B, 1, H // h, W // w))


def _fake_upsample(s, A, h, w):
    _check_fake(s, A)
    return s.new_empty((s.shape[0], s.shape[1], A.shape[2], A.shape[3]))


def _fake_affinity_aggregate(x, s, h, w, scale):
    return (_fake_affinity(x, s, h, w, scale, True),) + _fake_aggregate(x, s, h, w)


def _fake_associate(x, s, h, w, scale, n_iter):
    if s is None:
        s = _fake_pool(x, h, w)
    A, num, den = _fake_affinity_aggregate(x, s, h, w, scale)
    return num, A, den


def _fake_associate_backward(g, A, den, h, w):
    _check_fake(g, A, den)
    return g.new_empty((g.shape[0], g.shape[1], A.shape[2], A.shape[3]))


def _token_major_map(like, B, C, H, W):
    """A [B, C, H, W] tensor laid out token-major (the strides of channels_last), as the refine
    operators return their maps."""
    return like.new_empty((B, H, W, C)).permute(0, 3, 1, 2)


def _cast_inputs(dtype, *tensors):
    """csrc/refine.cpp's ``cast_input`` on fake tensors: each as a ``new_empty`` of the dtype
    autocast would give it (float32 / float16 / bfloat16 ones ``dtype``)."""
    return tuple(t if autocast_cast_dtype(t, dtype) == t.dtype else t.new_empty(t.shape, dtype=dtype)
                 for t in tensors)


def _relayout(t, shape, dtype):
    """csrc/refine.cpp's ``relayout``: ``t`` reshaped (a view where its strides allow) when no cast
    is needed, else a fresh contiguous tensor."""
    if t.dtype == dtype:
        return t.reshape(shape)
    return t.new_empty(shape, dtype=dtype)


def _fake_refine_forward(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, scale, dtype=None):
    if dtype is not None:
        s, qkv_weight, proj_weight = _cast_inputs(dtype, s, qkv_weight, proj_weight)
    _check_fake(s, qkv_weight, proj_weight)
    B, C, H, W = s.shape
    N, d, acc = H * W, C // heads, accumulation_dtype(s.dtype)
    # the layouts of refine.cpp's relayout: views of the matrix products' results without a cast
    qkvh = _relayout(s.new_empty((B, N, 3 * C)).view(B, N, heads, 3, d).permute(3, 0, 2, 1, 4),
                     (3, B * heads, N, d), acc)
    attn = s.new_empty((B * heads, N, N), dtype=acc)
    o = _relayout(s.new_empty((B * heads, N, d), dtype=acc).view(B, heads, N, d).transpose(1, 2),
                  (B * N, C), s.dtype)
    return _token_major_map(s, B, C, H, W), qkvh, attn, o


def _fake_refine_backward(grad, s, qkvh, attn, o, qkv_weight, proj_weight, heads, scale):
    # in the dtype the forward computed in (o's), s and the weights cast to it as the forward did
    s, qkv_weight, proj_weight = _cast_inputs(o.dtype, s, qkv_weight, proj_weight)
    _check_fake(grad, s, o, qkv_weight, proj_weight)
    return (_token_major_map(s, *s.shape), qkv_weight.new_empty(qkv_weight.shape),
            qkv_weight.new_empty((qkv_weight.shape[0],)), proj_weight.new_empty(proj_weight.shape),
            proj_weight.new_empty((proj_weight.shape[0],)))


def _fake_sta_forward(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale, n_iter, heads,
                      attn_scale, dtype=None):
    if dtype is not None:
        x, qkv_weight, proj_weight = _cast_inputs(dtype, x, qkv_weight, proj_weight)
    _check_fake(x, qkv_weight, proj_weight)
    s, A, den = _fake_associate(x, None, h, w, scale, n_iter)
    if x.device.type == "cuda":   # the CUDA kernels write the super tokens token-major (ops.cpp)
        s = _token_major_map(s, *s.shape)
    _, qkvh, attn, o = _fake_refine_forward(s, qkv_weight, qkv_bias, proj_weight, proj_bias, heads,
                                            attn_scale)
    return x.new_empty(x.shape), A, den, s, qkvh, attn, o


def _fake_sta(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale, n_iter, heads,
              attn_scale, dtype=None):
    return _fake_sta_forward(x, qkv_weight, qkv_bias, proj_weight, proj_bias, h, w, scale, n_iter,
                             heads, attn_scale, dtype)[0]


def _fake_sta_backward(grad, A, den, s, qkvh, attn, o, qkv_weight, proj_weight, h, w, heads,
                       attn_scale, x_dtype=None):
    _check_fake(grad, A, den, s)
    # the refine's backward runs on the gradient of its output, shaped like s
    _, *param_grads = _fake_refine_backward(s, s, qkvh, attn, o, qkv_weight, proj_weight, heads,
                                            attn_scale)
    return (grad.new_empty(grad.shape, dtype=x_dtype or grad.dtype), *param_grads)


FAKES = {
    "affinity": _fake_affinity,
    "aggregate": _fake_aggregate,
    "upsample": _fake_upsample,
    "affinity_aggregate": _fake_affinity_aggregate,
    "pool": _fake_pool,
    "associate": _fake_associate,
    "associate_backward": _fake_associate_backward,
}

#: The compiled family's module step (csrc/ops.cpp) and the refine (csrc/refine.cpp), with no
#: Triton counterpart.
FAKES_COMPILED = {
    "sta_forward": _fake_sta_forward,
    "sta": _fake_sta,
    "sta_backward": _fake_sta_backward,
    "refine_attention_forward": _fake_refine_forward,
    "refine_attention_backward": _fake_refine_backward,
}

#: Schemas of the Triton operators (the C++ ones of the same names are declared with the same text
#: in csrc/ops.cpp).
SCHEMAS = {
    "affinity": "(Tensor x, Tensor s, int h, int w, float scale, bool softmax) -> Tensor",
    "aggregate": "(Tensor x, Tensor A, int h, int w) -> (Tensor, Tensor)",
    "upsample": "(Tensor s, Tensor A, int h, int w) -> Tensor",
    "affinity_aggregate": "(Tensor x, Tensor s, int h, int w, float scale) -> (Tensor, Tensor, Tensor)",
    "pool": "(Tensor x, int h, int w) -> Tensor",
    "associate": "(Tensor x, Tensor? s, int h, int w, float scale, int n_iter) "
                 "-> (Tensor, Tensor, Tensor)",
    "associate_backward": "(Tensor g, Tensor A, Tensor den, int h, int w) -> Tensor",
}


# ------------------------------------------------------------------------------------------------
# The C++ family (csrc/ops.cpp)
# ------------------------------------------------------------------------------------------------

_COMPILED: Optional[Kernels] = None


def compiled_kernels() -> Kernels:
    """The C++ family ``stvit::*`` (CPU and CUDA kernels of ``stvit_kernels._C``); call only once
    the extension is loaded (:func:`stvit_kernels._ext.load_error` does, right after loading it)."""
    global _COMPILED
    if _COMPILED is None:
        ops = torch.ops.stvit
        for name, fake in {**FAKES, **FAKES_COMPILED}.items():
            torch.library.register_fake(f"stvit::{name}", fake)
        _COMPILED = register_family(Kernels(
            "stvit",
            ops.affinity.default, ops.aggregate.default, ops.upsample.default,
            ops.affinity_aggregate.default, ops.pool.default, ops.associate.default,
            ops.associate_backward.default))
    return _COMPILED


# ------------------------------------------------------------------------------------------------
# The Triton family (stvit_kernels/triton_kernels.py)
# ------------------------------------------------------------------------------------------------

#: The Triton ops run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET (read once,
#: as Triton does when its kernels are decorated).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LIB = torch.library.Library("stvit", "FRAGMENT")


def _triton_impl(name: str) -> Callable:
    fn = None

    def impl(*args):
        nonlocal fn
        if fn is None:  # imports triton on the first call only, and looks the function up once
            from . import triton_kernels

            fn = getattr(triton_kernels, name)
        return fn(*args)
    return impl


def _triton_refuse(name: str) -> Callable:
    def impl(*args):
        raise ValueError(f"stvit::triton_{name} runs on CUDA tensors (or on CPU tensors when "
                         f"TRITON_INTERPRET=1 is set before stvit_kernels is imported), got CPU "
                         f"tensors")
    return impl


def _define_triton() -> Kernels:
    for name in SCHEMAS:
        _LIB.define(f"triton_{name}{SCHEMAS[name]}")
        _LIB.impl(f"triton_{name}", _triton_impl(name), "CUDA")
        _LIB.impl(f"triton_{name}", _triton_impl(name) if TRITON_INTERPRET else _triton_refuse(name),
                  "CPU")
        torch.library.register_fake(f"stvit::triton_{name}", FAKES[name])
    ops = torch.ops.stvit
    return register_family(Kernels(
        "triton", ops.triton_affinity.default, ops.triton_aggregate.default,
        ops.triton_upsample.default, ops.triton_affinity_aggregate.default, ops.triton_pool.default,
        ops.triton_associate.default, ops.triton_associate_backward.default))


#: The Triton family (defined at import; triton itself is imported by the first kernel call).
TRITON = _define_triton()


# ------------------------------------------------------------------------------------------------
# The reference as a family: the Functions' formulas checked on their own (tests)
# ------------------------------------------------------------------------------------------------

def reference_kernels(name: str = "reference-kernels") -> Kernels:
    """The reference primitives as a kernel family, to check the autograd Functions' formulas in
    float64 apart from any kernel."""
    def pool(x, h, w):
        return F.avg_pool2d(x, (h, w))

    return register_family(Kernels(
        name, _ref.affinity, _ref.aggregate, _ref.upsample, _ref.affinity_aggregate, pool,
        composite_associate(_ref.affinity_aggregate, pool),
        composite_associate_backward(_ref.upsample)))
