"""Super Token Attention written a second way, for the module tests: the STA forward of DESIGN §1
with ``F.unfold`` / ``F.fold`` on the super-token grid and dense per-cell matmuls (the layout the
official code uses), independent of ``stvit_kernels.reference``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sta_forward(x, stoken_size, n_iter, scale, refine):
    """``refine``: callable on ``[B, C, hh, ww]`` (identity when None)."""
    h, w = stoken_size
    B, C, H0, W0 = x.shape
    pad_r, pad_b = (w - W0 % w) % w, (h - H0 % h) % h
    x = F.pad(x, (0, pad_r, 0, pad_b))
    H, W = x.shape[-2:]
    hh, ww = H // h, W // w
    L = hh * ww
    # [B, L, h*w, C]: the pixels of each cell
    pix = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, L, h * w, C)

    def nbrs(S):  # [B, C, hh, ww] -> [B, L, C, 9], zero outside the grid
        return F.unfold(S, 3, padding=1).reshape(B, S.shape[1], 9, L).permute(0, 3, 1, 2)

    def fold9(t):  # [B, L, X, 9] per-cell contributions -> [B, X, hh, ww] per super token
        X = t.shape[2]
        return F.fold(t.permute(0, 2, 3, 1).reshape(B, X * 9, L), (hh, ww), 3, padding=1)

    S = F.adaptive_avg_pool2d(x, (hh, ww))
    with torch.no_grad():
        for it in range(n_iter):
            A = ((pix @ nbrs(S)) * scale).softmax(-1)  # [B, L, h*w, 9]
            den = fold9(A.sum(2, keepdim=True))
            if it < n_iter - 1:
                S = fold9(pix.transpose(-1, -2) @ A) / (den + 1e-12)
    S = fold9(pix.transpose(-1, -2) @ A) / (den + 1e-12)  # gradient into x only
    if refine is not None:
        S = refine(S)
    y = nbrs(S) @ A.transpose(-1, -2)  # [B, L, C, h*w]
    y = y.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
    return y[:, :, :H0, :W0]
