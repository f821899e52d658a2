"""The official STViT super-token attention algorithm, op for op: the baseline a user would pick.

``OfficialStokenAttention`` runs the algorithm of the official ``StokenAttention`` (STViT,
CVPR 2023) with the same PyTorch ops in the same order, written here from the description in
``DESIGN.md`` §7 (no code of the official repository is copied):

1. pad right / bottom to multiples of ``(h, w)``; ``s = adaptive_avg_pool2d(x, (hh, ww))``;
2. ``pix = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh*ww, h*w, C)``;
3. the 3 x 3 neighbourhood of the super-token grid as convolutions with a 9-channel identity
   kernel: unfold ``U`` is ``conv2d`` (gather the 9 neighbours), fold ``F`` is
   ``conv_transpose2d`` (scatter back to them);
4. without gradient, ``n_iter`` passes: ``A = softmax(pix @ U(s) * scale)`` over the 9
   candidates, ``den = F(sum of A over the cell's pixels)``, and on every pass but the last
   ``s = F(pix^T @ A) / (den + 1e-12)``;
5. with gradient, the aggregation once more from the last ``A``, over ``den.detach() + 1e-12``;
6. refine: 1x1 ``qkv`` conv, ``q, k, v`` chunked per head, ``softmax(k^T q * scale, dim=-2)``,
   ``v @ attn``, 1x1 ``proj`` (or conv1x1 -> depthwise 5x5 -> conv1x1 with
   ``refine_attention=False``);
7. upsample: ``U(s) @ A^T`` per cell, back to ``[B, C, H, W]`` with reshape / permute, crop.

Its parameters and submodule names are those of :class:`stvit_kernels.SuperTokenAttention`
(``stoken_refine.qkv`` / ``stoken_refine.proj``, or ``stoken_refine.0/1/2``); the two identity
kernels are buffers named ``unfold.weights`` and ``fold.weights``, as in the official module.
A state dict of our module loads into it (the identity kernels are filled in when missing), and
:meth:`OfficialStokenAttention.from_module` copies one. With the same weights it matches our
module to float32 rounding (``tests/test_official_baseline.py``; on a GPU cuDNN's TF32
convolutions, on by default, add ~1e-4 to this path).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from stvit_kernels.module import conv_refine  # the same three convolutions, the official layout

#: The buffers of the official module that our SuperTokenAttention does not have.
IDENTITY_KEYS = ("unfold.weights", "fold.weights")


def _identity_kernel() -> torch.Tensor:
    """``[9, 1, 3, 3]``: output channel ``k`` picks the neighbour ``(k // 3 - 1, k % 3 - 1)``."""
    return torch.eye(9).reshape(9, 1, 3, 3)


class Unfold(nn.Module):
    """``[b, c, hh, ww] -> [b, c * 9, hh * ww]``: the 9 neighbours of every grid cell (zeros
    outside the grid), channel ``c * 9 + k``, by a convolution with the identity kernel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weights", _identity_kernel())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = t.shape
        out = F.conv2d(t.reshape(b * c, 1, hh, ww), self.weights, padding=1)
        return out.reshape(b, c * 9, hh * ww)


class Fold(nn.Module):
    """``[n, 9, hh, ww] -> [n, 1, hh, ww]``: each cell's 9 slots added to the neighbours they
    name (dropped outside the grid), by a transposed convolution with the identity kernel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weights", _identity_kernel())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(t, self.weights, padding=1)


class OfficialRefineAttention(nn.Module):
    """The official refine attention: ``softmax`` over the keys written as ``dim=-2`` of
    ``k^T q``, no fused attention kernel. Parameters as :class:`stvit_kernels.RefineAttention`."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, self.num_heads, 3 * C // self.num_heads, H * W).chunk(3, dim=2)
        attn = ((k.transpose(-1, -2) @ q) * self.scale).softmax(dim=-2)   # [B, heads, N keys, N queries]
        attn = self.attn_drop(attn)
        out = (v @ attn).reshape(B, C, H, W)
        return self.proj_drop(self.proj(out))


class OfficialStokenAttention(nn.Module):
    """Super token attention computed as the official code computes it (see the module
    docstring). Constructor arguments as :class:`stvit_kernels.SuperTokenAttention`.

    x: ``[B, dim, H, W]`` -> ``[B, dim, H, W]``.
    """

    def __init__(self, dim: int, stoken_size: Union[int, Sequence[int]], n_iter: int = 1,
                 refine: bool = True, refine_attention: bool = True, num_heads: int = 8,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.dim = dim
        self.n_iter = n_iter
        self.stoken_size = (stoken_size, stoken_size) if isinstance(stoken_size, int) else tuple(stoken_size)
        self.refine = refine
        self.refine_attention = refine_attention
        self.scale = dim ** -0.5
        self.unfold = Unfold()
        self.fold = Fold()
        if refine:
            if refine_attention:
                self.stoken_refine = OfficialRefineAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                                             qk_scale=qk_scale, attn_drop=attn_drop,
                                                             proj_drop=proj_drop)
            else:
                self.stoken_refine = conv_refine(dim)

    @classmethod
    def from_module(cls, sta: nn.Module) -> "OfficialStokenAttention":
        """The official algorithm with the configuration, weights, device and dtype of a
        :class:`stvit_kernels.SuperTokenAttention` (its own copy of the parameters)."""
        refine = getattr(sta, "refine", True)
        refine_attention = getattr(sta, "refine_attention", True)
        kw = {}
        if refine and refine_attention:
            r = sta.stoken_refine
            kw = dict(num_heads=r.num_heads, qkv_bias=r.qkv.bias is not None, qk_scale=r.scale,
                      attn_drop=r.attn_drop.p, proj_drop=r.proj_drop.p)
        off = cls(sta.dim, sta.stoken_size, n_iter=sta.n_iter, refine=refine,
                  refine_attention=refine_attention, **kw)
        p = next(sta.parameters(), None)
        if p is not None:
            off = off.to(device=p.device, dtype=p.dtype)
        off.load_state_dict(sta.state_dict())
        off.train(sta.training)
        return off

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict of our SuperTokenAttention has no identity kernels: keep the constants
        for key in IDENTITY_KEYS:
            mod, name = key.split(".")
            state_dict.setdefault(prefix + key, getattr(getattr(self, mod), name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _aggregate(self, pix: torch.Tensor, A: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
        """``num [B, C, hh, ww]``: ``pix^T @ A`` per cell, then fold to the neighbours."""
        B, _, _, C = pix.shape
        num = pix.transpose(-1, -2) @ A                                       # [B, hh*ww, C, 9]
        num = self.fold(num.permute(0, 2, 3, 1).reshape(B * C, 9, hh, ww))
        return num.reshape(B, C, hh, ww)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.stoken_size
        if (h, w) == (1, 1):
            return self.stoken_refine(x) if self.refine else x
        B, C, H0, W0 = x.shape
        pad_r, pad_b = (w - W0 % w) % w, (h - H0 % h) % h
        if pad_r > 0 or pad_b > 0:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        _, _, H, W = x.shape
        hh, ww = H // h, W // w

        s = F.adaptive_avg_pool2d(x, (hh, ww))                                # [B, C, hh, ww]
        pix = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh * ww, h * w, C)
        with torch.no_grad():
            for i in range(self.n_iter):
                su = self.unfold(s).transpose(1, 2).reshape(B, hh * ww, C, 9)
                A = (pix @ su * self.scale).softmax(-1)                       # [B, hh*ww, h*w, 9]
                den = self.fold(A.sum(2).transpose(1, 2).reshape(B, 9, hh, ww))   # [B, 1, hh, ww]
                if i < self.n_iter - 1:
                    s = self._aggregate(pix, A, hh, ww) / (den + 1e-12)
        s = self._aggregate(pix, A, hh, ww) / (den.detach() + 1e-12)         # gradient into x
        if self.refine:
            s = self.stoken_refine(s)
        su = self.unfold(s).transpose(1, 2).reshape(B, hh * ww, C, 9)
        y = su @ A.transpose(-1, -2)                                          # [B, hh*ww, C, h*w]
        y = y.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        if pad_r > 0 or pad_b > 0:
            y = y[:, :, :H0, :W0]
        return y
