"""The three STA ops: public functions -> one autograd Function per op -> backend primitives.

Each backward is written once, here, in terms of the backends' forward primitives
(``affinity`` / ``aggregate`` / ``upsample``, see :mod:`stvit_kernels.backends`), following the
gradients of DESIGN §1:

* affinity ``A(x, s)``: ``dlogit = A * (g - sum_k A g)``; ``dx = scale * upsample(s, dlogit)``,
  ``ds = scale * aggregate(x, dlogit).num``;
* aggregation ``(num, den)(x, A)``: ``dx = upsample(gnum, A)``,
  ``dA = affinity_logits(x, gnum) + gden[nbr]``;
* upsampling ``y(s, A)``: ``ds = aggregate(gy, A).num``, ``dA = affinity_logits(gy, s)``.

So the scatter-to-super-token terms of the backward are the aggregation kernel (a gather from the
super token's side: deterministic, no atomics), and the pixel-side terms are the upsampling and
logit kernels. The reference backend skips the Functions: plain autograd differentiates it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference as _ref
from ._utils import (StokenSize, _check_tensor, accumulation_dtype, check_affinity,
                     check_pixels_stokens, check_same, default_scale, grid_of, normalise, pair)
from .backends import Backend, resolve


def _softmax_backward(A: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A * (g - sum_k A * g)`` over the 9 neighbour slots (dim 1), in at least float32."""
    acc = accumulation_dtype(A.dtype)
    A32, g32 = A.to(acc), g.to(acc)
    return (A32 * (g32 - (A32 * g32).sum(dim=1, keepdim=True))).to(A.dtype)


class _AffinityFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, size, scale, be: Backend):
        A = be.affinity(x, s, size[0], size[1], scale, True)
        ctx.save_for_backward(x, s, A)
        ctx.size, ctx.scale, ctx.be = size, scale, be
        return A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gA):
        x, s, A = ctx.saved_tensors
        (h, w), scale, be = ctx.size, ctx.scale, ctx.be
        dlogit = _softmax_backward(A, gA)
        dx = ds = None
        if ctx.needs_input_grad[0]:
            dx = be.upsample(s, dlogit, h, w) * scale
        if ctx.needs_input_grad[1]:
            ds = be.aggregate(x, dlogit, h, w)[0] * scale
        return dx, ds, None, None, None


class _AggregateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, size, be: Backend):
        num, den = be.aggregate(x, A, size[0], size[1])
        ctx.save_for_backward(x, A)
        ctx.size, ctx.be = size, be
        ctx.set_materialize_grads(False)
        return num, den

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gnum, gden):
        x, A = ctx.saved_tensors
        (h, w), be = ctx.size, ctx.be
        dx = dA = None
        if ctx.needs_input_grad[0] and gnum is not None:
            dx = be.upsample(gnum, A, h, w)
        if ctx.needs_input_grad[1]:
            if gnum is not None:
                dA = be.affinity(x, gnum, h, w, 1.0, False)
            if gden is not None:
                term = _ref.broadcast_neighbours(gden, h, w)
                dA = term if dA is None else dA + term
        if ctx.needs_input_grad[0] and dx is None:
            dx = torch.zeros_like(x)
        if ctx.needs_input_grad[1] and dA is None:
            dA = torch.zeros_like(A)
        return dx, dA, None, None


class _UpsampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, A, size, be: Backend):
        y = be.upsample(s, A, size[0], size[1])
        ctx.save_for_backward(s, A)
        ctx.size, ctx.be = size, be
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        s, A = ctx.saved_tensors
        (h, w), be = ctx.size, ctx.be
        ds = dA = None
        if ctx.needs_input_grad[0]:
            ds = be.aggregate(gy, A, h, w)[0]
        if ctx.needs_input_grad[1]:
            dA = be.affinity(gy, s, h, w, 1.0, False)
        return ds, dA, None, None


def stoken_affinity(x: torch.Tensor, stokens: torch.Tensor, stoken_size: StokenSize,
                    scale: Optional[float] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """Association of every pixel with its 9 neighbouring super tokens.

    ``A[b, k, i, j] = softmax_k(scale * <x[b, :, i, j], stokens[b, :, i//h + k//3 - 1, j//w + k%3 - 1]>)``,
    where a neighbour outside the super-token grid has logit exactly 0 (and still takes part in the
    softmax, as in the official code).

    Args:
        x: ``[B, C, H, W]`` pixel features, ``H % h == 0`` and ``W % w == 0``.
        stokens: ``[B, C, H/h, W/w]`` super tokens.
        stoken_size: ``h`` or ``(h, w)``.
        scale: logit scale, default ``C ** -0.5``.
        backend: force a backend (``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``), default
            the one set by :func:`use_backend`, else ``"auto"``.

    Returns:
        ``[B, 9, H, W]``, summing to 1 over dim 1.

    Example:
        >>> x = torch.randn(2, 64, 56, 56)
        >>> s = torch.nn.functional.avg_pool2d(x, 8)
        >>> A = stoken_affinity(x, s, 8)            # [2, 9, 56, 56]
    """
    size = pair(stoken_size)
    check_pixels_stokens(x, "x", stokens, "stokens", size)
    scale = default_scale(x.shape[1], scale)
    be = resolve(x, backend)
    if be.autograd_native:
        return be.affinity(x, stokens, size[0], size[1], scale, True)
    return _AffinityFn.apply(x, stokens, size, scale, be)


def stoken_aggregate(x: torch.Tensor, affinity: torch.Tensor, stoken_size: StokenSize, *,
                     backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse aggregation of pixels into super tokens.

    ``num[b, :, u, v] = sum A[b, k, i, j] * x[b, :, i, j]`` and ``den[b, 0, u, v] = sum A[b, k, i, j]``
    over the pixels ``(i, j)`` and slots ``k`` whose neighbour ``k`` is the super token ``(u, v)``.
    The updated super tokens of STA are ``num / (den + 1e-12)``.

    Args:
        x: ``[B, C, H, W]``, ``H % h == 0`` and ``W % w == 0``.
        affinity: ``[B, 9, H, W]``.
        stoken_size: ``h`` or ``(h, w)``.

    Returns:
        ``num [B, C, H/h, W/w]``, ``den [B, 1, H/h, W/w]``.

    Example:
        >>> num, den = stoken_aggregate(x, A, 8)
        >>> s = num / (den + 1e-12)
    """
    size = pair(stoken_size)
    _check_pixels_affinity(x, affinity, size)
    be = resolve(x, backend)
    if be.autograd_native:
        return be.aggregate(x, affinity, size[0], size[1])
    return _AggregateFn.apply(x, affinity, size, be)


def stoken_upsample(stokens: torch.Tensor, affinity: torch.Tensor, stoken_size: StokenSize, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """Sparse upsampling of super tokens back to pixels.

    ``y[b, :, i, j] = sum_k A[b, k, i, j] * stokens[b, :, nbr_k(i, j)]`` over the valid neighbours.

    Args:
        stokens: ``[B, C, hh, ww]``.
        affinity: ``[B, 9, hh*h, ww*w]``.
        stoken_size: ``h`` or ``(h, w)``.

    Returns:
        ``[B, C, hh*h, ww*w]``.

    Example:
        >>> y = stoken_upsample(s, A, 8)            # [2, 64, 56, 56]
    """
    size = pair(stoken_size)
    _check_stokens_affinity(stokens, affinity, size)
    be = resolve(affinity, backend)
    if be.autograd_native:
        return be.upsample(stokens, affinity, size[0], size[1])
    return _UpsampleFn.apply(stokens, affinity, size, be)


def _check_pixels_affinity(x, A, size):
    _check_tensor("x", x)
    grid_of(x, size, "x")
    check_affinity(A, x, "x", size)


def _check_stokens_affinity(s, A, size):
    _check_tensor("stokens", s)
    _check_tensor("affinity", A)
    check_same(["stokens", "affinity"], [s, A])
    hh, ww = grid_of(A, size, "affinity")
    if A.shape[1] != 9 or tuple(s.shape[2:]) != (hh, ww) or s.shape[0] != A.shape[0]:
        raise ValueError(f"stokens [B, C, hh, ww] and affinity [B, 9, hh*h, ww*w] do not match: "
                         f"stokens.shape={tuple(s.shape)}, affinity.shape={tuple(A.shape)}, "
                         f"stoken_size={size}")


class _AssociateFn(torch.autograd.Function):
    """Last association step of STA: ``A = affinity(x, s)`` and ``s' = num(x, A) / (den(A) + 1e-12)``
    in one fused pass, with the gradient flowing into ``x`` through ``num`` only (``A``, ``den``
    and ``s`` are treated as constants, as in the official model): ``dx = upsample(g / den, A)``."""

    @staticmethod
    def forward(ctx, x, s, size, scale, be: Backend):
        with torch.no_grad():
            A, num, den = be.affinity_aggregate(x, s, size[0], size[1], scale)
        acc = accumulation_dtype(num.dtype)
        inv_den = 1.0 / (den.to(acc) + 1e-12)
        ctx.save_for_backward(A, inv_den)
        ctx.size, ctx.be = size, be
        ctx.mark_non_differentiable(A)
        return (num.to(acc) * inv_den).to(num.dtype), A

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _gA):
        A, inv_den = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            with torch.no_grad():
                gs = (g.to(inv_den.dtype) * inv_den).to(g.dtype)
                dx = ctx.be.upsample(gs, A, ctx.size[0], ctx.size[1])
        return dx, None, None, None, None


def associate(x: torch.Tensor, stokens: torch.Tensor, stoken_size: StokenSize, n_iter: int = 1,
              scale: Optional[float] = None, *, backend: Optional[str] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The association stage of STA (DESIGN §1 steps 4-7), as the official model runs it.

    Starting from ``stokens``, ``n_iter - 1`` fused affinity + aggregation passes update the super
    tokens without gradient; the last pass computes the final association ``A`` and the super tokens
    ``num / (den + 1e-12)`` with the gradient flowing into ``x`` through ``num`` only.

    Args:
        x: ``[B, C, H, W]``, ``H % h == 0`` and ``W % w == 0``.
        stokens: ``[B, C, H/h, W/w]`` initial super tokens (usually ``avg_pool2d(x, (h, w))``).
        n_iter: number of association iterations, >= 1.

    Returns:
        ``stokens [B, C, H/h, W/w]`` (differentiable w.r.t. ``x``) and ``A [B, 9, H, W]`` (constant).
    """
    size = pair(stoken_size)
    check_pixels_stokens(x, "x", stokens, "stokens", size)
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")
    scale = default_scale(x.shape[1], scale)
    be = resolve(x, backend)
    s = stokens.detach()
    with torch.no_grad():
        for _ in range(n_iter - 1):
            _, num, den = be.affinity_aggregate(x, s, size[0], size[1], scale)
            s = normalise(num, den)
    return _AssociateFn.apply(x, s, size, scale, be)
