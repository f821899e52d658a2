"""A second, independent implementation of the three ops: plain Python loops over pixels and
neighbour slots, straight from DESIGN §1. Slow; only for tiny shapes."""
from __future__ import annotations

import math

import torch


def _nbr(i, j, k, h, w, hh, ww):
    """The super-token cell of neighbour k of pixel (i, j), or None if outside the grid."""
    u, v = i // h + k // 3 - 1, j // w + k % 3 - 1
    return (u, v) if 0 <= u < hh and 0 <= v < ww else None


def affinity(x, s, h, w, scale):
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    A = torch.zeros(B, 9, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                logits = []
                for k in range(9):
                    n = _nbr(i, j, k, h, w, hh, ww)
                    logits.append(0.0 if n is None else
                                  scale * float(torch.dot(x[b, :, i, j].double(), s[b, :, n[0], n[1]].double())))
                m = max(logits)
                e = [math.exp(l - m) for l in logits]
                for k in range(9):
                    A[b, k, i, j] = e[k] / sum(e)
    return A


def aggregate(x, A, h, w):
    B, C, H, W = x.shape
    hh, ww = H // h, W // w
    num = torch.zeros(B, C, hh, ww, dtype=torch.float64)
    den = torch.zeros(B, 1, hh, ww, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for k in range(9):
                    n = _nbr(i, j, k, h, w, hh, ww)
                    if n is None:
                        continue
                    a = float(A[b, k, i, j])
                    num[b, :, n[0], n[1]] += a * x[b, :, i, j].double()
                    den[b, 0, n[0], n[1]] += a
    return num, den


def upsample(s, A, h, w):
    B, C, hh, ww = s.shape
    H, W = A.shape[-2:]
    y = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for k in range(9):
                    n = _nbr(i, j, k, h, w, hh, ww)
                    if n is not None:
                        y[b, :, i, j] += float(A[b, k, i, j]) * s[b, :, n[0], n[1]].double()
    return y
