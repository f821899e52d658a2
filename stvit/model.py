"""The STViT model (Huang et al., "Vision Transformer with Super Token Sampling", CVPR 2023) built
on :class:`stvit_kernels.SuperTokenAttention`.

The module tree and the parameter names follow the official implementation, so an official
checkpoint loads through :func:`load_official_checkpoint`::

    patch_embed.proj.{0..11}                   conv3x3/s2 -> GELU -> BN -> conv3x3 -> GELU -> BN ->
                                               conv3x3/s2 -> GELU -> BN -> conv3x3 -> GELU -> BN
    layers.i.blocks.j.pos_embed.conv           x + depthwise 3x3
    layers.i.blocks.j.norm1.norm               channel LayerNorm (eps 1e-6)
    layers.i.blocks.j.attn.stoken_refine.{qkv,proj}
    layers.i.blocks.j.norm2                    BatchNorm2d
    layers.i.blocks.j.mlp2.{fc1,conv.conv,fc2} 1x1 -> GELU -> x + depthwise 3x3 -> 1x1
    layers.i.blocks.j.gamma_{1,2}              layer scale, [1, C, 1, 1] (only where enabled)
    layers.i.downsample.proj.{0,1}             conv3x3/s2 -> BN (i < last stage)
    proj, norm                                 1x1 conv to ``projection`` -> BN -> SiLU -> avg pool
    head                                       Linear

Example:
    >>> import torch, stvit
    >>> model = stvit.stvit_small(num_classes=1000).eval()
    >>> logits = model(torch.randn(2, 3, 224, 224))                  # [2, 1000]
    >>> backbone = stvit.stvit_small(features_only=True)
    >>> [f.shape[-1] for f in backbone(torch.randn(1, 3, 224, 224))]  # strides 4, 8, 16, 32
    [56, 28, 14, 7]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from stvit_kernels import SuperTokenAttention
from stvit_kernels.module import OFFICIAL_CONSTANT_KEYS

__all__ = [
    "STViT", "StokenAttentionLayer", "BasicLayer", "PatchEmbed", "PatchMerging", "Mlp", "ResDWC",
    "LayerNorm2d", "DropPath", "stvit_small", "stvit_base", "stvit_large",
    "load_official_checkpoint", "LoadResult", "CheckpointMismatchError", "MODEL_CONFIGS",
]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

class DropPath(nn.Module):
    """Stochastic depth: in training, zero the whole residual branch of a sample with probability
    ``drop_prob`` and scale the kept ones by ``1 / (1 - drop_prob)``; identity in eval mode.

    ``x: [B, ...] -> [B, ...]``.
    """

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        if not 0. <= drop_prob < 1.:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0. or not self.training:
            return x
        keep = 1. - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (parameters under ``norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # contiguous NCHW out, as the official code (the STA kernels and 1x1 convs read it next)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class ResDWC(nn.Module):
    """``x + depthwise_conv(x)`` (a residual depthwise convolution, parameters under ``conv``)."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Mlp(nn.Module):
    """Convolutional MLP on ``[B, C, H, W]``: ``fc1`` (1x1) -> GELU -> dropout ->
    ``conv`` (x + depthwise 3x3) -> ``fc2`` (1x1) -> dropout."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act1 = act_layer()
        self.drop = nn.Dropout(drop)
        self.conv = ResDWC(hidden_features, 3)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act1(self.fc1(x)))
        return self.drop(self.fc2(self.conv(x)))


class StokenAttentionLayer(nn.Module):
    """One STViT block on ``x: [B, dim, H, W] -> [B, dim, H, W]``::

        x = x + dwconv3x3(x)                                   # pos_embed
        x = x + drop_path(gamma_1 * attn(norm1(x)))            # norm1: channel LayerNorm
        x = x + drop_path(gamma_2 * mlp2(norm2(x)))            # norm2: BatchNorm2d

    ``gamma_1`` / ``gamma_2`` (``[1, dim, 1, 1]``, initialised to ``init_values``) exist only with
    ``layerscale=True``.
    """

    def __init__(self, dim: int, n_iter: int, stoken_size, num_heads: int = 1, mlp_ratio: float = 4.,
                 qkv_bias: bool = False, qk_scale: Optional[float] = None, drop: float = 0.,
                 attn_drop: float = 0., drop_path: float = 0., act_layer=nn.GELU,
                 layerscale: bool = False, init_values: float = 1e-5,
                 backend: Optional[str] = None):
        super().__init__()
        self.layerscale = bool(layerscale)
        self.pos_embed = ResDWC(dim, 3)
        self.norm1 = LayerNorm2d(dim)
        self.attn = SuperTokenAttention(dim, stoken_size=stoken_size, n_iter=n_iter,
                                        num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                        attn_drop=attn_drop, proj_drop=drop, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp2 = Mlp(dim, hidden_features=int(dim * mlp_ratio), out_features=dim,
                        act_layer=act_layer, drop=drop)
        if self.layerscale:
            self.gamma_1 = nn.Parameter(torch.full((1, dim, 1, 1), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((1, dim, 1, 1), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_embed(x)
        a = self.attn(self.norm1(x))
        x = x + self.drop_path(self.gamma_1 * a if self.layerscale else a)
        m = self.mlp2(self.norm2(x))
        return x + self.drop_path(self.gamma_2 * m if self.layerscale else m)


class PatchEmbed(nn.Module):
    """The convolutional stem, ``[B, in_chans, H, W] -> [B, out_channels, ~H/4, ~W/4]``
    (two stride-2 3x3 convolutions, each output size ``ceil(n / 2)``)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, 2, 1), nn.GELU(), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(mid),
            nn.Conv2d(mid, out_channels, 3, 2, 1), nn.GELU(), nn.BatchNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchMerging(nn.Module):
    """Downsampling between stages: conv3x3/s2 -> BN,
    ``[B, C_in, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 2, 1),
                                  nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks, then an optional :class:`PatchMerging` (``downsample``).

    ``forward(x: [B, dim, H, W])`` -> ``[B, out_dim, ceil(H/2), ceil(W/2)]`` (or
    ``[B, dim, H, W]`` without downsampling), as the official stage; :meth:`forward_blocks` is the
    stage's feature map before downsampling.
    """

    def __init__(self, depth: int, dim: int, out_dim: Optional[int], n_iter: int, stoken_size,
                 num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: Union[float, Sequence[float]] = 0., layerscale: bool = False,
                 init_values: float = 1e-5, use_checkpoint: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        dpr = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            StokenAttentionLayer(dim, n_iter=n_iter, stoken_size=stoken_size, num_heads=num_heads,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                 drop=drop, attn_drop=attn_drop, drop_path=dpr[i],
                                 layerscale=layerscale, init_values=init_values, backend=backend)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, out_dim) if out_dim is not None else None

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def _per_stage(value, n: int, name: str) -> list:
    """A per-stage list of length ``n`` from a list/tuple (checked) or a scalar (broadcast)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per stage ({n}), got {value!r}")
        return list(value)
    return [value] * n


class STViT(nn.Module):
    """Super Token Vision Transformer.

    Args:
        in_chans: input channels.
        num_classes: classes of the ``head`` Linear; 0 makes ``head`` an identity (``forward``
            then returns the pooled ``[B, projection]`` features).
        embed_dim, depths, num_heads: per stage.
        n_iter, stoken_size: per stage (scalars are broadcast); ``stoken_size`` entries are ``h`` or
            ``(h, w)``, ``1`` meaning global self-attention over all tokens of the stage.
        mlp_ratio, qkv_bias, qk_scale: as in the official model.
        drop_rate: dropout after the stem, in the MLPs and after the refine attention's projection.
        attn_drop_rate: dropout on the refine attention weights.
        drop_path_rate: stochastic depth, growing linearly from 0 to this over all blocks.
        projection: channels of the final 1x1 convolution (1024 in the official models); ``None``
            or 0 means no projection (``norm`` then normalises the last stage's channels).
        layerscale: per stage (or one bool): whether its blocks have ``gamma_1`` / ``gamma_2``.
        init_values: initial layer-scale value.
        use_checkpoint: gradient checkpointing of every block while gradients are enabled (saves
            activation memory; as in the official code, a block's BatchNorm then updates its
            running statistics twice per training step).
        features_only: return the stage feature maps instead of logits. ``proj``, ``norm`` and
            ``head`` are then not created (an official classification checkpoint still loads:
            :func:`load_official_checkpoint` drops those keys and lists them in
            ``LoadResult.dropped_keys``). Stages after the last one in ``out_indices`` (and that
            stage's downsampling) are built, so that the checkpoint's keys match, but not run:
            their parameters get no gradient (DDP then needs ``find_unused_parameters=True``).
        out_indices: the stages whose maps ``forward`` returns in ``features_only`` mode (their
            strides are 4, 8, 16, 32; each is the stage's output before its downsampling).
        backend: the ``stvit_kernels`` backend of every super token attention (default: auto).

    Shapes:
        ``forward(x: [B, in_chans, H, W])`` -> ``[B, num_classes]``, or in ``features_only`` mode a
        list with, for every ``i`` in ``out_indices`` (in increasing order),
        ``[B, embed_dim[i], H_i, W_i]`` where ``H_0 = ceil(ceil(H / 2) / 2)`` and
        ``H_{i+1} = ceil(H_i / 2)`` (so ``H / 4, H / 8, ...`` when ``H`` is a multiple of 32).

    Example:
        >>> model = STViT(embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3],
        ...               num_heads=[1, 2, 5, 8], stoken_size=[8, 4, 1, 1])
        >>> model(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), n_iter: Union[int, Sequence[int]] = 1,
                 stoken_size: Union[int, Sequence] = (8, 4, 2, 1), mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 projection: Optional[int] = 1024,
                 layerscale: Union[bool, Sequence[bool]] = False, init_values: float = 1e-6,
                 use_checkpoint: bool = False, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), backend: Optional[str] = None):
        super().__init__()
        embed_dim, depths = list(embed_dim), list(depths)
        n = len(depths)
        if len(embed_dim) != n:
            raise ValueError(f"embed_dim and depths need one entry per stage, got "
                             f"embed_dim={embed_dim}, depths={depths}")
        num_heads = _per_stage(num_heads, n, "num_heads")
        n_iter = _per_stage(n_iter, n, "n_iter")
        stoken_size = _per_stage(stoken_size, n, "stoken_size")
        layerscale = _per_stage(layerscale, n, "layerscale")

        self.num_classes = num_classes
        self.num_layers = n
        self.embed_dim = embed_dim
        self.features_only = bool(features_only)
        self.num_features = projection or embed_dim[-1]

        self.patch_embed = PatchEmbed(in_chans, embed_dim[0])
        self.pos_drop = nn.Dropout(p=drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(depths[:i])
            self.layers.append(BasicLayer(
                depths[i], embed_dim[i], embed_dim[i + 1] if i < n - 1 else None,
                n_iter=n_iter[i], stoken_size=stoken_size[i], num_heads=num_heads[i],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[start:start + depths[i]],
                layerscale=layerscale[i], init_values=init_values, use_checkpoint=use_checkpoint,
                backend=backend))

        if self.features_only:
            idx = sorted({int(i) for i in out_indices})
            if not idx or idx[0] < 0 or idx[-1] >= n:
                raise ValueError(f"out_indices must be stage indices in [0, {n}), got {out_indices!r}")
            self.out_indices = tuple(idx)
            self.feature_info = [dict(num_chs=embed_dim[i], reduction=4 * 2 ** i, module=f"layers.{i}")
                                 for i in self.out_indices]
        else:
            self.proj = nn.Conv2d(embed_dim[-1], projection, 1) if projection else nn.Identity()
            self.norm = nn.BatchNorm2d(self.num_features)
            self.swish = nn.SiLU()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn gradient checkpointing of every block on or off."""
        for layer in self.layers:
            layer.use_checkpoint = enable

    def forward_feature_maps(self, x: torch.Tensor,
                             indices: Optional[Sequence[int]] = None) -> List[torch.Tensor]:
        """The stage outputs (before downsampling) of the stages in ``indices`` (default: all),
        ``x: [B, in_chans, H, W]`` -> list of ``[B, embed_dim[i], H_i, W_i]`` (strides 4 .. 32)."""
        wanted = set(range(self.num_layers) if indices is None else indices)
        if not wanted or not wanted <= set(range(self.num_layers)):
            raise ValueError(f"indices must be stage indices in [0, {self.num_layers}), got {indices!r}")
        last = max(wanted)
        x = self.pos_drop(self.patch_embed(x))
        out = []
        for i, layer in enumerate(self.layers[:last + 1]):
            x = layer.forward_blocks(x)
            if i in wanted:
                out.append(x)
            if i < last:
                x = layer.downsample(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, in_chans, H, W] -> [B, num_features]`` (the input of ``head``)."""
        if self.features_only:
            raise RuntimeError("forward_features needs the classification parts (proj, norm), which "
                               "a features_only model does not have; use forward / forward_feature_maps")
        x = self.pos_drop(self.patch_embed(x))
        for layer in self.layers:
            x = layer(x)
        x = self.swish(self.norm(self.proj(x)))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            return self.forward_feature_maps(x, self.out_indices)
        return self.head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

_COMMON = dict(n_iter=[1, 1, 1, 1], stoken_size=[8, 4, 1, 1], mlp_ratio=4, qkv_bias=True,
               qk_scale=None, projection=1024)

#: The official configurations (parameters: 25.5M / 51.7M / 95.0M with the 1000-class head).
MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {
    "stvit_small": dict(_COMMON, embed_dim=[64, 128, 320, 512], depths=[3, 5, 9, 3],
                        num_heads=[1, 2, 5, 8], layerscale=[False] * 4, init_values=1e-5),
    "stvit_base": dict(_COMMON, embed_dim=[96, 192, 384, 512], depths=[4, 6, 14, 6],
                       num_heads=[2, 3, 6, 8], layerscale=[False, False, True, True], init_values=1e-6),
    "stvit_large": dict(_COMMON, embed_dim=[96, 192, 448, 640], depths=[4, 7, 19, 8],
                        num_heads=[2, 3, 7, 10], layerscale=[False, False, True, True], init_values=1e-6),
}


def _build(name: str, kwargs: Dict[str, Any]) -> STViT:
    return STViT(**{**MODEL_CONFIGS[name], **kwargs})


def stvit_small(**kwargs) -> STViT:
    """STViT-S: dims [64, 128, 320, 512], depths [3, 5, 9, 3], heads [1, 2, 5, 8], super tokens
    [8, 4, 1, 1], no layer scale; 25.5M parameters, 83.6% ImageNet-1K top-1 (official). Keyword
    arguments override the configuration / go to :class:`STViT` (e.g. ``drop_path_rate``)."""
    return _build("stvit_small", kwargs)


def stvit_base(**kwargs) -> STViT:
    """STViT-B: dims [96, 192, 384, 512], depths [4, 6, 14, 6], heads [2, 3, 6, 8], super tokens
    [8, 4, 1, 1], layer scale (1e-6) in stages 3-4; 51.7M parameters, 84.8% top-1 (official)."""
    return _build("stvit_base", kwargs)


def stvit_large(**kwargs) -> STViT:
    """STViT-L: dims [96, 192, 448, 640], depths [4, 7, 19, 8], heads [2, 3, 7, 10], super tokens
    [8, 4, 1, 1], layer scale (1e-6) in stages 3-4; 95.0M parameters, 85.3% top-1 (official)."""
    return _build("stvit_large", kwargs)


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------

class CheckpointMismatchError(RuntimeError):
    """An official state dict does not match the model (keys or shapes); the message lists them."""


class LoadResult(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]
    #: ``(key, checkpoint shape, model shape)`` of entries whose shapes differ (not loaded).
    mismatched_keys: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]
    #: keys dropped on purpose: the official constant ``attn.unfold/fold.weights`` buffers and the
    #: parts the model was built without (``proj/norm/head`` in features_only mode, ``head`` with
    #: ``num_classes=0``).
    dropped_keys: List[str]


_WRAPPER_KEYS = ("model", "state_dict")


def _read_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    # Official training checkpoints also hold the run's argparse.Namespace ("args"): allow exactly
    # that class on top of the weights-only unpickler's tensors and containers.
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    allow = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"could not read {os.fspath(path)!r} with torch.load(weights_only=True): {err}\n"
            "If you trust the file, load it yourself with "
            "torch.load(path, map_location='cpu', weights_only=False) and pass the dict.") from err


def _unwrap(obj: Any) -> Dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return dict(obj)


def load_official_checkpoint(model: STViT, path_or_state_dict: Union[str, os.PathLike, Mapping],
                             strict: bool = True) -> LoadResult:
    """Load an official STViT checkpoint (``hhb072/STViT``) into ``model`` in place.

    Steps: read a file with ``torch.load(map_location="cpu", weights_only=True)`` (or take the
    given mapping); unwrap a ``"model"`` / ``"state_dict"`` entry; strip a leading ``module.``
    (DDP); drop the official constant buffers ``*.attn.unfold.weights`` / ``*.attn.fold.weights``
    (identity kernels this implementation does not need); drop the keys of parts the model was
    built without: ``proj.*``, ``norm.*``, ``head.*`` for a ``features_only`` model and ``head.*``
    for ``num_classes=0``; then compare keys and shapes.

    With ``strict=True`` (default) any missing key, unexpected key or shape mismatch raises
    :class:`CheckpointMismatchError` (a ``RuntimeError``) naming all of them, before anything is
    copied. With ``strict=False`` the matching entries are loaded and the rest reported.

    Args:
        model: an :class:`STViT` (or any module with the official parameter names).
        path_or_state_dict: a checkpoint file, or a (possibly wrapped) state dict.
        strict: see above.

    Returns:
        :class:`LoadResult` (``missing_keys``, ``unexpected_keys``, ``mismatched_keys``,
        ``dropped_keys``).

    Example:
        >>> model = stvit.stvit_small()
        >>> stvit.load_official_checkpoint(model, "stvit-small-224.pth")
        >>> backbone = stvit.stvit_small(features_only=True)
        >>> stvit.load_official_checkpoint(backbone, "stvit-small-224.pth").dropped_keys[-3:]
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = _read_checkpoint(path_or_state_dict)
    else:
        obj = path_or_state_dict
    sd = _unwrap(obj)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}

    drop_prefixes: Tuple[str, ...] = ()
    if getattr(model, "features_only", False):
        drop_prefixes = ("proj.", "norm.", "head.")
    elif getattr(model, "num_classes", None) == 0:
        drop_prefixes = ("head.",)
    constant_suffixes = tuple("attn." + k for k in OFFICIAL_CONSTANT_KEYS)
    dropped = [k for k in sd if k.endswith(constant_suffixes) or k.startswith(drop_prefixes)]
    for k in dropped:
        del sd[k]

    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        lines = [f"the checkpoint does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + ", ".join(
                f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched))
        raise CheckpointMismatchError("\n".join(lines))

    bad = {k for k, _, _ in mismatched}
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in bad}, strict=False)
    return LoadResult(missing, unexpected, mismatched, dropped)
