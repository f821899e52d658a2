"""The STA ops: public function -> argument checks -> backend primitive.

Every public function validates its arguments here (``ValueError`` / ``TypeError`` naming the
offending shapes), picks a backend (:func:`stvit_kernels.backends.resolve`) and calls its
primitive. The primitives are differentiable: on the fused backends through the autograd Functions
of :mod:`stvit_kernels._library` (DESIGN §1 gradients, written once for every kernel family, in
terms of the family's raw operators); the reference backend is differentiated by plain autograd.

Under ``torch.autocast`` the ops behave like ``matmul``: their float32 / float16 / bfloat16 inputs
run in the autocast dtype (float64 stays float64), the kernels accumulate in float32 and the super
tokens are normalised in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._library import needs_grad
from ._utils import (StokenSize, _check_tensor, autocast_inputs, check_affinity, check_n_iter,
                     check_pixels_stokens, check_same, default_scale, grid_of, pair)
from .backends import resolve


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
    x, stokens = autocast_inputs(x, stokens)
    check_pixels_stokens(x, "x", stokens, "stokens", size)
    scale = default_scale(x.shape[1], scale)
    return resolve(x, backend).affinity(x, stokens, size[0], size[1], scale, True)


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
    x, affinity = autocast_inputs(x, affinity)
    _check_pixels_affinity(x, affinity, size)
    return resolve(x, backend).aggregate(x, affinity, size[0], size[1])


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
    stokens, affinity = autocast_inputs(stokens, affinity)
    _check_stokens_affinity(stokens, affinity, size)
    return resolve(affinity, backend).upsample(stokens, affinity, size[0], size[1])


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


def initial_stokens(x: torch.Tensor, stoken_size: StokenSize, *,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``avg_pool2d(x, stoken_size)``, the super tokens STA starts from, on the backend's kernel
    (the ``cpu`` backend has its own single-pass one; a differentiable ``avg_pool2d`` when ``x``
    needs a gradient). ``H``, ``W`` multiples of the size."""
    size = pair(stoken_size)
    _check_tensor("x", x)
    grid_of(x, size, "x")
    if needs_grad(x):
        return F.avg_pool2d(x, size)
    return resolve(x, backend).pool(x, size[0], size[1])


def associate(x: torch.Tensor, stokens: Optional[torch.Tensor], stoken_size: StokenSize,
              n_iter: int = 1, scale: Optional[float] = None, *, backend: Optional[str] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The association stage of STA (DESIGN §1 steps 2, 4-7), as the official model runs it.

    Starting from ``stokens`` (or, when it is None, the average-pooled ``x``), ``n_iter - 1`` fused
    affinity + aggregation passes update the super tokens without gradient; the last pass computes
    the final association ``A`` and the super tokens ``num / (den + 1e-12)`` with the gradient
    flowing into ``x`` through ``num`` only.

    Args:
        x: ``[B, C, H, W]``, ``H % h == 0`` and ``W % w == 0``.
        stokens: ``[B, C, H/h, W/w]`` initial super tokens (no gradient flows into them), or None
            for ``avg_pool2d(x, (h, w))``.
        n_iter: number of association iterations, >= 1.

    Returns:
        ``stokens [B, C, H/h, W/w]`` (differentiable w.r.t. ``x``) and ``A [B, 9, H, W]`` (constant).
    """
    size = pair(stoken_size)
    if stokens is None:
        (x,) = autocast_inputs(x)
        _check_tensor("x", x)
        grid_of(x, size, "x")
    else:
        x, stokens = autocast_inputs(x, stokens)
        check_pixels_stokens(x, "x", stokens, "stokens", size)
    check_n_iter(n_iter)
    scale = default_scale(x.shape[1], scale)
    return resolve(x, backend).associate(x, stokens, size[0], size[1], scale, n_iter)
