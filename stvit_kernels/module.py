"""``SuperTokenAttention``: a drop-in for the official ``StokenAttention`` built on the fused ops."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _ext
from ._library import FamilyStep, Refine, family_step_forward, needs_grad
from ._utils import (StokenSize, autocast_cast_dtype, autocast_dtype, autocast_inputs, cast,
                     check_n_iter, pair)
from .backends import resolve

#: The refine attention as C++ calls when the extension is built (it always is where a compiler
#: was), else None and RefineAttention._forward_python: the SDPA composite and the written-out
#: forward (csrc/refine.cpp).
_BUILT = _ext.load_error() is None
_REFINE_OP = torch.ops.stvit.refine_attention.default if _BUILT else None
_REFINE_FORWARD = torch.ops.stvit.refine_attention_forward.default if _BUILT else None
#: The whole module in one C++ call (csrc/ops.cpp), for the compiled kernel family: one autograd
#: node in C++ where a gradient is needed (stvit::sta_forward, then stvit::sta_backward).
_STA = torch.ops.stvit.sta.default if _BUILT else None

#: Whether autocast is on for any device: one C call, before the per-device question (which
#: builds a torch.device) is asked.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)

#: Up to this many tokens (and without attention dropout) the refine runs written out: one C++
#: call forward and, when a gradient is needed, one autograd node
#: (:class:`stvit_kernels._library.Refine`, which keeps the [B, heads, N, N] softmax for its
#: backward, as the official code does); beyond it, SDPA, whose fused kernels keep no N x N map.
#: 256 covers the STA refines of STViT up to 512² images and its stage 3-4 attention at 224².
REFINE_FUSED_MAX_TOKENS = 256

def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` for a parameter (or a None bias): the dict lookup that
    ``nn.Module.__getattr__`` makes, without the failed attribute lookup before it (~0.5 µs a
    time on CPython, several per call on the hot path); plain ``getattr`` for anything that is
    not in ``_parameters`` (e.g. a parametrized weight)."""
    params = module.__dict__["_parameters"]
    return params[name] if name in params else getattr(module, name)


#: Buffers of the official module that this one computes implicitly (identity kernels of its
#: unfold / fold convolutions); dropped when loading an official state dict.
OFFICIAL_CONSTANT_KEYS = ("unfold.weights", "fold.weights")


class RefineAttention(nn.Module):
    """Multi-head self-attention over the tokens of a ``[B, C, H, W]`` map, parameter-compatible
    with the official ``Attention`` (``qkv`` and ``proj`` are 1x1 convolutions).

    The ``qkv`` output channels are read as ``[heads, 3, head_dim]`` (q, k, v inside each head: the
    official channel order). The 1x1 convolutions run as matrix products on the token-major view
    ``[B, N, C]``, so q, k and v come out as strided views with unit stride along ``head_dim`` and
    16-byte aligned rows, a layout the fused kernels of ``F.scaled_dot_product_attention`` (flash,
    memory-efficient) accept as it is, for any number of tokens ``N`` (one included).

    Up to :data:`REFINE_FUSED_MAX_TOKENS` tokens and without attention dropout, the same function
    runs written out instead (csrc/refine.cpp: softmax attention in float32 for half inputs, one
    C++ call forward, and one autograd node, :class:`stvit_kernels._library.Refine`, with a
    backward by hand), which costs far fewer host calls per step than SDPA and its autograd graph.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.attn_drop_p = attn_drop
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.attn_drop_p if self.training else 0.0
        params = self.weights()
        if not _BUILT:
            out = self._forward_python(x, p)
        elif self.written_out(x.shape[2] * x.shape[3]):
            # written out (csrc/refine.cpp); under autocast the operator casts the inputs as
            # autocast would, itself (no autograd node per cast)
            dtype = autocast_dtype(x) if _any_autocast() else None
            if needs_grad(x, *params):
                out = Refine.apply(x, *params, self.num_heads, self.scale, dtype)
            else:
                out = _REFINE_FORWARD(x, *params, self.num_heads, self.scale, dtype)[0]
        else:  # the same ops as _forward_python (SDPA), composed in C++: one call
            out = _REFINE_OP(x, *params, self.num_heads, self.scale, p)
        return self.proj_drop(out) if self.training and self.proj_drop.p > 0 else out

    def written_out(self, tokens: int) -> bool:
        """Whether a forward over ``tokens`` tokens runs written out (csrc/refine.cpp) rather than
        as SDPA: at most :data:`REFINE_FUSED_MAX_TOKENS` tokens and no attention dropout."""
        return tokens <= REFINE_FUSED_MAX_TOKENS and not (self.training and self.attn_drop_p > 0)

    def weights(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """``(qkv.weight, qkv.bias, proj.weight, proj.bias)``, the biases None when absent."""
        qkv, proj = self._modules["qkv"], self._modules["proj"]
        return _param(qkv, "weight"), _param(qkv, "bias"), _param(proj, "weight"), _param(proj, "bias")

    def _forward_python(self, x: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """``stvit::refine_attention`` in Python, for builds without the extension."""
        B, C, H, W = x.shape
        N, heads = H * W, self.num_heads
        tokens = x.reshape(B, C, N).transpose(1, 2)                               # [B, N, C]
        qkv = F.linear(tokens, self.qkv.weight.reshape(3 * C, C), self.qkv.bias)  # [B, N, 3C]
        q, k, v = qkv.view(B, N, heads, 3, C // heads).permute(3, 0, 2, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=self.scale)
        out = F.linear(out.transpose(1, 2).reshape(B, N, C), self.proj.weight.reshape(C, C),
                       self.proj.bias)
        return out.transpose(1, 2).view(B, C, H, W)


def conv_refine(dim: int) -> nn.Sequential:
    """The official refine without attention (``refine_attention=False``): conv1x1 -> depthwise
    5x5 -> conv1x1, with the official submodule indices."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 1, 1, 0),
        nn.Conv2d(dim, dim, 5, 1, 2, groups=dim),
        nn.Conv2d(dim, dim, 1, 1, 0),
    )


class SuperTokenAttention(nn.Module):
    """Super Token Attention (STViT, CVPR 2023), state-dict compatible with the official
    ``StokenAttention`` (minus its two constant ``unfold`` / ``fold`` buffers, which loading drops).

    Forward on ``x: [B, dim, H, W]``: pad to multiples of ``stoken_size``, start from the
    average-pooled super tokens, run ``n_iter`` association iterations (no gradient but through the
    final aggregation, into ``x``), refine the super tokens (multi-head attention, or
    conv1x1 -> depthwise 5x5 -> conv1x1 with ``refine_attention=False``), upsample them back with the
    association (gradient into the super tokens only) and crop. ``stoken_size == (1, 1)`` is
    ``refine`` over all ``H * W`` tokens.

    Args:
        dim: channels ``C``.
        stoken_size: ``h`` or ``(h, w)``.
        n_iter: association iterations (>= 1).
        refine, refine_attention, num_heads, qkv_bias, qk_scale, attn_drop, proj_drop: as in the
            official module.
        backend: force a backend for the STA ops (default: :func:`use_backend` / ``auto``).

    Example:
        >>> sta = SuperTokenAttention(64, stoken_size=8, num_heads=1)
        >>> y = sta(torch.randn(2, 64, 56, 56))      # [2, 64, 56, 56]
    """

    def __init__(self, dim: int, stoken_size: StokenSize, n_iter: int = 1, refine: bool = True,
                 refine_attention: bool = True, num_heads: int = 8, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, attn_drop: float = 0., proj_drop: float = 0.,
                 backend: Optional[str] = None):
        super().__init__()
        check_n_iter(n_iter)
        self.dim = dim
        self.n_iter = n_iter
        self.stoken_size = pair(stoken_size)
        self.refine = refine
        self.refine_attention = refine_attention
        self.scale = dim ** -0.5
        self.backend = backend
        if refine:
            if refine_attention:
                self.stoken_refine = RefineAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias,
                                                     qk_scale=qk_scale, attn_drop=attn_drop,
                                                     proj_drop=proj_drop)
            else:
                self.stoken_refine = conv_refine(dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, stoken_size={self.stoken_size}, n_iter={self.n_iter}, "
                f"refine={self.refine}, refine_attention={self.refine_attention}")

    def _refine(self, s: torch.Tensor) -> torch.Tensor:
        return self.stoken_refine(s) if self.refine else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SuperTokenAttention(dim={self.dim}) expects x of shape "
                             f"[B, {self.dim}, H, W], got x.shape={shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got x.dtype={x.dtype}")
        autocast = _any_autocast() and torch.is_autocast_enabled(x.device.type)
        refine = self._modules["stoken_refine"] if self.refine else None
        weights = refine.weights() if self.refine and self.refine_attention else None
        if refine is not None and not autocast:
            weight = weights[0] if weights is not None else refine[0].weight
            if x.dtype != weight.dtype:
                raise TypeError(f"SuperTokenAttention has {weight.dtype} parameters but got "
                                f"x.dtype={x.dtype}; convert the module (.to(dtype)) or run under "
                                f"torch.autocast")
        h, w = self.stoken_size
        if (h, w) == (1, 1):
            return self._refine(x)
        B, C, H0, W0 = x.shape
        if H0 == 0 or W0 == 0:
            raise ValueError(f"x must have a non-empty image, got x.shape={tuple(x.shape)}")
        pad_r, pad_b = (w - W0 % w) % w, (h - H0 % h) % h
        if pad_r or pad_b:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        be = resolve(x, self.backend)
        y = self._one_step(be, x, autocast, weights) if weights is not None else None
        if y is None:
            if autocast:
                (x,) = autocast_inputs(x)
            s, A = be.associate(x, None, h, w, self.scale, self.n_iter)
            # under autocast the refine may return another precision than the association's
            s = cast(self._refine(s), A.dtype)
            y = be.upsample(s, A, h, w)
        if pad_r or pad_b:
            y = y[:, :, :H0, :W0]
        return y

    def _one_step(self, be, x: torch.Tensor, autocast: bool, params) -> Optional[torch.Tensor]:
        """The module on padded ``x`` as one C++ call, ``stvit::sta`` (one autograd node in C++
        when a gradient is needed: ``stvit::sta_forward``, then ``stvit::sta_backward``), where
        that call applies: a backend with ``one_step`` (the compiled kernels), the
        attention refine (its ``weights()``: ``params``) with at most
        :data:`REFINE_FUSED_MAX_TOKENS` super tokens and no dropout in training, and under
        autocast parameters that cast to ``x``'s dtype. None otherwise (the per-piece path). The
        refine module's own forward (and its hooks) is not called on this path. Under autocast
        the operator casts ``x`` and the parameters itself (its ``dtype`` argument), where the
        casts would otherwise be autograd nodes of their own.

        A backend with ``composed_step`` (Triton) runs the same pieces as one autograd node
        composed in Python (:class:`stvit_kernels._library.FamilyStep`), the cast of ``x`` under
        autocast inside it; without a gradient, the same operator calls in a row."""
        if not (be.one_step or (be.composed_step and _BUILT)):
            return None
        r = self._modules["stoken_refine"]
        h, w = self.stoken_size
        if (not r.written_out((x.shape[2] // h) * (x.shape[3] // w))
                or (self.training and r.proj_drop.p > 0)):
            return None
        dtype = None
        if autocast:
            dtype = autocast_dtype(x)
            # one dtype after autocast's casts (not so for a float64 x: the per-piece path)
            cast_to = autocast_cast_dtype(x, dtype)
            if any(p is not None and autocast_cast_dtype(p, dtype) != cast_to for p in params):
                return None
        args = (h, w, self.scale, self.n_iter, r.num_heads, r.scale, dtype)
        if not be.one_step:
            K = be.kernels()
            if needs_grad(x, *params):
                return FamilyStep.apply(K.name, x, *params, *args)
            return family_step_forward(K, x, params, *args)[0]
        return _STA(x, *params, *args)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in OFFICIAL_CONSTANT_KEYS:
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
