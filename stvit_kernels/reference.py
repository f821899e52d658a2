"""The pure-PyTorch reference: the oracle every other backend is checked against.

Shapes (``hh = H / h``, ``ww = W / w``)::

    x, y      [B, C, H, W]     pixel features
    s         [B, C, hh, ww]   super tokens
    A         [B, 9, H, W]     association of each pixel with its 9 neighbouring super tokens

Neighbour ``k`` of the pixel ``(i, j)`` is the super token of the cell
``(i // h + k // 3 - 1, j // w + k % 3 - 1)``. The functions below work on the *cell view*
``x.reshape(B, C, hh, h, ww, w)``; the super-token side is the zero-padded grid shifted 9 ways
(9 copies of the small ``s`` only), so nothing of size ``(H*W) x (hh*ww)`` and no 9x copy of ``x``
is ever built. A candidate outside the grid reads a zero super token: its logit is exactly 0 and
it still takes part in the softmax, as in the official code. Everything is differentiable with
plain autograd (double backward included).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ._utils import OFFSETS


def _cells(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, K, H, W] -> [B, K, hh, h, ww, w]`` (a view when possible)."""
    B, K, H, W = t.shape
    return t.reshape(B, K, H // h, h, W // w, w)


def neighbours(s: torch.Tensor) -> torch.Tensor:
    """``s: [B, C, hh, ww] -> [B, C, 9, hh, ww]``: entry ``k`` at cell ``(u, v)`` is the super token
    of cell ``(u + di, v + dj)``, or zeros outside the grid."""
    hh, ww = s.shape[-2:]
    sp = F.pad(s, (1, 1, 1, 1))
    return torch.stack([sp[:, :, 1 + di:1 + di + hh, 1 + dj:1 + dj + ww] for di, dj in OFFSETS], dim=2)


def scatter_to_stokens(partial: torch.Tensor) -> torch.Tensor:
    """Inverse bookkeeping of :func:`neighbours`: ``partial: [B, C, 9, hh, ww]`` holds, per cell, a
    contribution to each of its 9 neighbouring super tokens; returns their sums ``[B, C, hh, ww]``.
    Contributions to neighbours outside the grid are dropped."""
    hh, ww = partial.shape[-2:]
    pp = F.pad(partial, (1, 1, 1, 1))
    out = None
    for k, (di, dj) in enumerate(OFFSETS):
        # super token (u, v) receives from the cell (u - di, v - dj)
        term = pp[:, :, k, 1 - di:1 - di + hh, 1 - dj:1 - dj + ww]
        out = term if out is None else out + term
    return out


def affinity(x: torch.Tensor, s: torch.Tensor, h: int, w: int, scale: float,
             softmax: bool = True) -> torch.Tensor:
    """``A[b, k, i, j] = softmax_k(scale * <x[b, :, i, j], s[b, :, nbr_k(i, j)]>)``, ``[B, 9, H, W]``.

    With ``softmax=False`` the scaled logits themselves (0 for an invalid neighbour)."""
    B, C, H, W = x.shape
    logits = torch.einsum("bcuivj,bckuv->bkuivj", _cells(x, h, w), neighbours(s)) * scale
    if softmax:
        logits = logits.softmax(dim=1)
    return logits.reshape(B, 9, H, W)


def aggregate(x: torch.Tensor, A: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``num[b, :, u, v] = sum of A[b, k, i, j] * x[b, :, i, j]`` and ``den = sum of A[b, k, i, j]``
    over the pixels and neighbour slots ``k`` that point at super token ``(u, v)``;
    ``[B, C, hh, ww]`` and ``[B, 1, hh, ww]``."""
    Ac = _cells(A, h, w)
    num = scatter_to_stokens(torch.einsum("bcuivj,bkuivj->bckuv", _cells(x, h, w), Ac))
    den = scatter_to_stokens(Ac.sum(dim=(3, 5)).unsqueeze(1))
    return num, den


def upsample(s: torch.Tensor, A: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``y[b, :, i, j] = sum_k A[b, k, i, j] * s[b, :, nbr_k(i, j)]``, ``[B, C, H, W]``."""
    B, _, H, W = A.shape
    y = torch.einsum("bckuv,bkuivj->bcuivj", neighbours(s), _cells(A, h, w))
    return y.reshape(B, s.shape[1], H, W)


def affinity_aggregate(x: torch.Tensor, s: torch.Tensor, h: int, w: int, scale: float):
    """``A = affinity(x, s)`` followed by ``aggregate(x, A)``: returns ``(A, num, den)``."""
    A = affinity(x, s, h, w, scale)
    num, den = aggregate(x, A, h, w)
    return A, num, den


def broadcast_neighbours(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``t: [B, 1, hh, ww] -> [B, 9, hh*h, ww*w]``: entry ``k`` at pixel ``(i, j)`` is ``t`` at the
    pixel's neighbour ``k`` (0 outside the grid). The ``gden`` term of the aggregation backward."""
    B, _, hh, ww = t.shape
    nb = neighbours(t).reshape(B, 9, hh, 1, ww, 1)
    return nb.expand(B, 9, hh, h, ww, w).reshape(B, 9, hh * h, ww * w)
