"""Argument parsing and validation shared by every op and backend.

All checks happen here, in Python, before any kernel runs, so that a bad call raises a
``ValueError`` / ``TypeError`` naming the offending shapes instead of crashing inside a kernel.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

StokenSize = Union[int, Sequence[int]]

# Neighbour k = 0..8 of a cell (ci, cj) is the cell (ci + di, cj + dj), di = k // 3 - 1, dj = k % 3 - 1.
OFFSETS: Tuple[Tuple[int, int], ...] = tuple((k // 3 - 1, k % 3 - 1) for k in range(9))

#: Added to the normaliser of the aggregation, as the official code does.
EPS = 1e-12


def _is_int(v) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def pair(stoken_size: StokenSize) -> Tuple[int, int]:
    """``8 -> (8, 8)``, ``(8, 4) -> (8, 4)``; anything else raises."""
    if _is_int(stoken_size):
        size = (int(stoken_size), int(stoken_size))
    elif isinstance(stoken_size, (tuple, list)):  # torch.Size is a tuple
        if len(stoken_size) != 2:
            raise ValueError(f"stoken_size must be an int or a pair (h, w), got {stoken_size!r} "
                             f"of length {len(stoken_size)}")
        if not all(_is_int(v) for v in stoken_size):
            raise TypeError(f"stoken_size must hold ints, got {stoken_size!r}")
        size = (int(stoken_size[0]), int(stoken_size[1]))
    else:
        raise TypeError(f"stoken_size must be an int or a pair of ints, got {stoken_size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"stoken_size must be positive, got {stoken_size!r}")
    return size


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got {name}.shape={tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {name}.dtype={t.dtype}")


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Same dtype and same device for all tensors of one call."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{first_name} and {name} must have the same dtype, got "
                            f"{first_name}.dtype={first.dtype}, {name}.dtype={t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{first_name} and {name} must be on the same device, got "
                             f"{first_name}.device={first.device}, {name}.device={t.device}")


def grid_of(x: torch.Tensor, size: Tuple[int, int], name: str = "x") -> Tuple[int, int]:
    """The super-token grid ``(hh, ww)`` of a pixel tensor whose H, W are multiples of ``size``."""
    H, W = x.shape[-2:]
    h, w = size
    if H == 0 or W == 0:
        raise ValueError(f"{name} must have a non-empty image, got {name}.shape={tuple(x.shape)}")
    if H % h or W % w:
        raise ValueError(
            f"the op-level functions need H and W divisible by stoken_size; got "
            f"{name}.shape={tuple(x.shape)} and stoken_size={size} (SuperTokenAttention pads for you)")
    return H // h, W // w


def check_pixels_stokens(x: torch.Tensor, x_name: str, s: torch.Tensor, s_name: str,
                         size: Tuple[int, int]) -> None:
    """``x: [B, C, H, W]`` against ``s: [B, C, H/h, W/w]``."""
    _check_tensor(x_name, x)
    _check_tensor(s_name, s)
    check_same([x_name, s_name], [x, s])
    hh, ww = grid_of(x, size, x_name)
    expected = (x.shape[0], x.shape[1], hh, ww)
    if tuple(s.shape) != expected:
        raise ValueError(f"{s_name} must have shape [B, C, H/h, W/w] = {expected}, got "
                         f"{s_name}.shape={tuple(s.shape)} with {x_name}.shape={tuple(x.shape)} "
                         f"and stoken_size={size}")


def check_affinity(A: torch.Tensor, like: torch.Tensor, like_name: str,
                   size: Tuple[int, int]) -> None:
    """``A: [B, 9, H, W]`` against a pixel tensor ``[B, C, H, W]`` (or its super tokens)."""
    _check_tensor("affinity", A)
    check_same([like_name, "affinity"], [like, A])
    B, H, W = like.shape[0], like.shape[2], like.shape[3]
    expected = (B, 9, H, W)
    if tuple(A.shape) != expected:
        raise ValueError(f"affinity must have shape [B, 9, H, W] = {expected}, got "
                         f"affinity.shape={tuple(A.shape)} with {like_name}.shape={tuple(like.shape)} "
                         f"and stoken_size={size}")


def check_n_iter(n_iter) -> None:
    """``n_iter``: an int >= 1 (``TypeError`` for a non-int, ``ValueError`` for a value below 1)."""
    if not _is_int(n_iter):
        raise TypeError(f"n_iter must be an int >= 1, got {n_iter!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be an int >= 1, got {n_iter!r}")


def default_scale(C: int, scale: Optional[float]) -> float:
    """``C ** -0.5`` (the full channel count, as in the official code) unless given; a given scale
    must be a finite real number."""
    if scale is None:
        return float(C) ** -0.5 if C > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.Tensor)):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return value


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is. (An autograd Function must not return
    the result of a no-op ``.to()``: torch 2.11's torch.compile then gives it a zero gradient.)"""
    return t if t.dtype == dtype else t.to(dtype)


def normalise(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / (den + 1e-12)`` computed in at least float32 (1e-12 underflows in float16)."""
    acc = accumulation_dtype(num.dtype)
    return cast(cast(num, acc) / (cast(den, acc) + EPS), num.dtype)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(t: torch.Tensor) -> Optional[torch.dtype]:
    """Under ``torch.autocast`` for ``t``'s device, the autocast dtype; else None."""
    device_type = t.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast_dtype(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype :func:`autocast_inputs` gives ``t`` (``dtype``: the autocast dtype or None), as
    the operators that cast their inputs themselves (``dtype`` argument) do."""
    return dtype if dtype is not None and t.dtype in _AUTOCAST_ELIGIBLE else t.dtype


def autocast_inputs(*tensors):
    """Under ``torch.autocast`` for the tensors' device, the float32 / float16 / bfloat16 ones cast
    to the autocast dtype (as autocast does for ``matmul``); otherwise unchanged. Anything that is
    not a floating tensor passes through for the checks to reject."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    dtype = autocast_dtype(first)
    if dtype is None:
        return tensors
    return tuple(cast(t, dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE
                 else t for t in tensors)
