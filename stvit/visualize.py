"""Pictures of the super-token association, in the spirit of Figure 4 of the STViT paper.

Two sources of pixel features:

- **raw RGB** (default): STA as superpixel clustering. The colours, standardised per channel over
  the image (STA's affinity is a dot product, so the features must be centred, as the model's
  normalised features are), start from the average-pooled super tokens of a ``stoken_size`` grid
  and go through ``n_iter`` association iterations of :func:`stvit_kernels.associate`.
- **a trained model** (``--checkpoint``): the input of a stage-1 block's super token attention,
  associated exactly as that block does it (its super-token size, scale and ``n_iter``, unless
  ``--n-iter`` asks for more).

The figure has four panels: the image with the super-token grid; every pixel coloured by the super
token it is most associated with (argmax of the association over its 9 neighbours, mapped to the
super token; 9 colours, so that no two super tokens a pixel can choose between share one); each
pixel painted with the mean colour of its super token's cluster; the soft association map of one
super token. :func:`colour_variance` gives the number behind "the clusters follow the image": the
within-cluster colour variance of the association's clusters against that of the plain grid.

Example::

    python -m stvit.visualize photo.jpg --out fig.png
    python -m stvit.visualize photo.jpg --out fig.png --checkpoint runs/stvit/last.pt
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

import stvit_kernels as sk
from stvit_kernels._utils import pair

from .data import IMAGENET_MEAN, IMAGENET_STD, check_img_size
from .model import CheckpointMismatchError, STViT, load_official_checkpoint

__all__ = ["Association", "rgb_association", "model_association", "hard_labels", "grid_labels",
           "token_map", "cluster_colour_variance", "colour_variance", "load_image",
           "load_backbone", "draw", "main"]


class Association(NamedTuple):
    """The association of one image: ``affinity [9, H, W]`` (sums to 1 over the 9 neighbours),
    ``stokens [C, hh, ww]``, the ``stoken_size (h, w)`` and ``stride``, the image pixels per
    affinity pixel (1 on RGB, 4 on stage-1 features)."""
    affinity: torch.Tensor
    stokens: torch.Tensor
    stoken_size: Tuple[int, int]
    stride: int = 1

    @property
    def grid(self) -> Tuple[int, int]:
        return tuple(self.stokens.shape[-2:])


# ----------------------------------------------------------------------------------------------
# Associations
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def rgb_association(image: torch.Tensor, stoken_size: Union[int, Tuple[int, int]] = 16, n_iter: int = 10,
                    scale: Optional[float] = None, backend: Optional[str] = None) -> Association:
    """STA as superpixel clustering of the colours of ``image [3, H, W]`` (values in [0, 1], ``H``
    and ``W`` multiples of the super-token size): standardise each channel, average-pool the initial
    super tokens, run ``n_iter`` association iterations (:func:`stvit_kernels.associate`)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image [3, H, W], got shape {tuple(image.shape)}")
    size = pair(stoken_size)
    x = image.float()
    x = (x - x.mean((1, 2), keepdim=True)) / (x.std((1, 2), keepdim=True) + 1e-6)
    x = x[None].contiguous()
    s0 = F.avg_pool2d(x, size)
    s, A = sk.associate(x, s0, size, n_iter=n_iter, scale=scale, backend=backend)
    return Association(A[0], s[0], size, 1)


@torch.no_grad()
def model_association(model: STViT, image: torch.Tensor, block: int = -1,
                      n_iter: Optional[int] = None) -> Association:
    """The association a stage-1 block of ``model`` computes for ``image [3, H, W]`` (normalised
    model input): the input of ``model.layers[0].blocks[block].attn`` associated with that module's
    super-token size, scale and backend, over ``n_iter`` iterations (default: the module's)."""
    blocks = model.layers[0].blocks
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"stage 1 has {len(blocks)} blocks; --block {block} is out of range")
    attn = blocks[block].attn
    if tuple(attn.stoken_size) == (1, 1):
        raise ValueError("this model's stage 1 has no super tokens (stoken_size 1)")
    seen = []
    hook = attn.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    was_training = model.training
    try:
        model.eval()
        model.forward_feature_maps(image[None], indices=[0])
    finally:
        hook.remove()
        model.train(was_training)
    x = seen[0]
    h, w = attn.stoken_size
    H, W = x.shape[-2:]
    if H % h or W % w:
        raise ValueError(f"stage-1 features of {H}x{W} do not divide into {h}x{w} super tokens; use an "
                         f"image size that is a multiple of {32 * max(h, w) // 8}")
    s0 = F.avg_pool2d(x, (h, w))
    s, A = sk.associate(x, s0, (h, w), n_iter=n_iter or attn.n_iter, scale=attn.scale, backend=attn.backend)
    stride = image.shape[-1] // W
    return Association(A[0], s[0], (h, w), stride)


# ----------------------------------------------------------------------------------------------
# Labels, maps and the number
# ----------------------------------------------------------------------------------------------

def _neighbours(H: int, W: int, size: Tuple[int, int]):
    """Row / column of every pixel's 9 candidate super tokens, ``[9, H, W]`` each, and their validity."""
    h, w = size
    hh, ww = H // h, W // w
    k = torch.arange(9)
    ti = (torch.arange(H) // h)[None, :, None] + (k // 3 - 1)[:, None, None]
    tj = (torch.arange(W) // w)[None, None, :] + (k % 3 - 1)[:, None, None]
    ti, tj = ti.expand(9, H, W), tj.expand(9, H, W)
    valid = (ti >= 0) & (ti < hh) & (tj >= 0) & (tj < ww)
    return ti, tj, valid


def hard_labels(assoc: Association) -> torch.Tensor:
    """``[H, W]`` index ``u * ww + v`` of the super token each pixel is most associated with (argmax
    over its valid neighbours; a neighbour outside the grid is never chosen)."""
    A = assoc.affinity.float()
    H, W = A.shape[-2:]
    ti, tj, valid = _neighbours(H, W, assoc.stoken_size)
    k = A.masked_fill(~valid, -1.0).argmax(0, keepdim=True)
    return (ti.gather(0, k) * assoc.grid[1] + tj.gather(0, k))[0]


def grid_labels(H: int, W: int, stoken_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """``[H, W]`` index of the grid cell of every pixel (the clusters before any association)."""
    h, w = pair(stoken_size)
    return (torch.arange(H) // h)[:, None] * (W // w) + (torch.arange(W) // w)[None, :]


def token_map(assoc: Association, u: int, v: int) -> torch.Tensor:
    """``[H, W]`` soft association of super token ``(u, v)`` with every pixel (0 outside the 3x3
    cells around it, where no pixel can choose it)."""
    hh, ww = assoc.grid
    if not (0 <= u < hh and 0 <= v < ww):
        raise ValueError(f"super token ({u}, {v}) is outside the {hh}x{ww} grid")
    A = assoc.affinity.float()
    ti, tj, valid = _neighbours(*A.shape[-2:], assoc.stoken_size)
    return (A * (valid & (ti == u) & (tj == v))).sum(0)


def cluster_colour_variance(image: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over pixels of the squared distance (summed over channels) between a pixel's colour and
    the mean colour of its cluster: ``image [C, H, W]``, ``labels [H, W]`` integer cluster ids."""
    C = image.shape[0]
    if labels.shape != image.shape[1:]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the image {tuple(image.shape)}")
    x = image.reshape(C, -1).double()
    lab = labels.reshape(-1).long()
    n = torch.bincount(lab).double().clamp(min=1)
    mean = torch.zeros(C, n.numel(), dtype=torch.float64).index_add_(1, lab, x) / n
    return float(((x - mean[:, lab]) ** 2).sum(0).mean())


def _upsample_labels(labels: torch.Tensor, stride: int) -> torch.Tensor:
    return labels.repeat_interleave(stride, 0).repeat_interleave(stride, 1)


def colour_variance(image: torch.Tensor, assoc: Association) -> Dict[str, float]:
    """Within-cluster colour variance (:func:`cluster_colour_variance`) of ``image [3, H, W]`` for
    the plain super-token grid and for the association's clusters (:func:`hard_labels`), and their
    ratio: ``{"grid": ..., "association": ..., "ratio": association / grid}``."""
    lab = _upsample_labels(hard_labels(assoc), assoc.stride)
    H, W = lab.shape
    img = image[:, :H, :W]
    h, w = assoc.stoken_size
    grid = cluster_colour_variance(img, grid_labels(H, W, (h * assoc.stride, w * assoc.stride)))
    ours = cluster_colour_variance(img, lab)
    return {"grid": grid, "association": ours, "ratio": ours / grid}


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def load_image(path: str, max_side: Optional[int] = None, multiple: int = 1,
               square: Optional[int] = None) -> torch.Tensor:
    """An image file as ``[3, H, W]`` float32 in [0, 1]. ``square``: shorter side resized to it and
    the centre square cropped (model input). Otherwise: shrunk so that its longer side is at most
    ``max_side``, then cropped at the right and bottom to multiples of ``multiple``."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    if square:
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        img = img.resize((square, square), Image.BICUBIC, box=(left, top, left + side, top + side))
    elif max_side and max(w, h) > max_side:
        f = max_side / max(w, h)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BICUBIC)
    import numpy as np

    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.).permute(2, 0, 1).contiguous()
    H, W = (x.shape[1] // multiple) * multiple, (x.shape[2] // multiple) * multiple
    if H == 0 or W == 0:
        raise ValueError(f"image {path!r} ({x.shape[2]}x{x.shape[1]}) is smaller than one super token "
                         f"({multiple}x{multiple})")
    return x[:, :H, :W].contiguous()


def load_backbone(checkpoint: str, model: Optional[str] = None) -> Tuple[STViT, str]:
    """A stage-1 backbone (``features_only``) with the weights of ``checkpoint``: a ``stvit.train``
    checkpoint (its architecture is stored in it) or an official one (architecture ``model``,
    default ``stvit_small``). Weights of another architecture raise
    :class:`~stvit.CheckpointMismatchError`. Returns ``(model, name)``."""
    import argparse as _argparse

    from .train import CHECKPOINT_FORMAT, build_model

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
    with torch.serialization.safe_globals([_argparse.Namespace]):
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    kwargs = None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        cfg = obj["config"]
        if model is not None and model != cfg["model"]:
            raise CheckpointMismatchError(f"checkpoint {checkpoint!r} is of {cfg['model']}, not {model}")
        model, kwargs = cfg["model"], cfg.get("model_kwargs")
    name = model or "stvit_small"
    net = build_model(name, 1000, kwargs, features_only=True, out_indices=(0,))
    try:
        load_official_checkpoint(net, obj)
    except CheckpointMismatchError as err:
        lines = [line.strip() for line in str(err).splitlines()[1:]]
        detail = "; ".join(line[:160] + ("..." if len(line) > 160 else "") for line in lines)
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint!r} does not hold {name} weights (pass --model with the architecture "
            f"it was trained as): {detail}") from None
    return net.eval(), name


# ----------------------------------------------------------------------------------------------
# The figure
# ----------------------------------------------------------------------------------------------

# 9 colours: a pixel's 9 candidate super tokens always get 9 different ones ((u % 3, v % 3)).
_PALETTE = torch.tensor([[0.12, 0.47, 0.71], [1.00, 0.50, 0.05], [0.17, 0.63, 0.17],
                         [0.84, 0.15, 0.16], [0.58, 0.40, 0.74], [0.55, 0.34, 0.29],
                         [0.89, 0.47, 0.76], [0.74, 0.74, 0.13], [0.09, 0.75, 0.81]])


def _boundaries(labels: torch.Tensor) -> torch.Tensor:
    b = torch.zeros_like(labels, dtype=torch.bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def draw(image: torch.Tensor, assoc: Association, out: str, token: Optional[Tuple[int, int]] = None,
         title: Optional[str] = None) -> str:
    """Write the four-panel figure of ``assoc`` over ``image [3, H, W]`` (in [0, 1]) to ``out``
    (PNG); ``token`` is the super token of the soft map (default: the grid's centre)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    hh, ww = assoc.grid
    u, v = token if token is not None else (hh // 2, ww // 2)
    h, w = assoc.stoken_size
    sh, sw = h * assoc.stride, w * assoc.stride          # a super-token cell in image pixels
    lab = _upsample_labels(hard_labels(assoc), assoc.stride)
    H, W = lab.shape
    img = image[:, :H, :W].permute(1, 2, 0).clamp(0, 1)
    gray = img.mean(2, keepdim=True).expand(H, W, 3)

    colour = _PALETTE[((lab // ww) % 3) * 3 + (lab % ww) % 3]
    hard = 0.45 * gray + 0.55 * colour
    edges = _boundaries(lab)
    hard[edges] = 1.0

    n = torch.bincount(lab.reshape(-1), minlength=hh * ww).clamp(min=1).float()
    means = torch.zeros(hh * ww, 3).index_add_(0, lab.reshape(-1), img.reshape(-1, 3)) / n[:, None]
    flat = means[lab]
    flat[edges] = 0.0

    soft = _upsample_labels(token_map(assoc, u, v), assoc.stride)
    # the soft map lives on the 3x3 cells around the token: show those (and one cell more) enlarged
    r0, r1 = max(0, (u - 2) * sh), min(H, (u + 3) * sh)
    c0, c1 = max(0, (v - 2) * sw), min(W, (v + 3) * sw)
    stats = colour_variance(image, assoc)

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8 * H / W + 0.8))
    panels = [
        (img, f"super-token grid ({hh}x{ww} cells of {sh}x{sw} px)"),
        (hard, "most associated super token"),
        (flat, f"cluster colours (variance {stats['association']:.4f} vs grid {stats['grid']:.4f})"),
        (gray[r0:r1, c0:c1], f"soft association of super token ({u}, {v}), enlarged"),
    ]
    for ax, (pic, name) in zip(axes, panels):
        ax.imshow(pic.numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    for i in range(1, hh):
        axes[0].axhline(i * sh - 0.5, color="w", lw=0.6)
    for j in range(1, ww):
        axes[0].axvline(j * sw - 0.5, color="w", lw=0.6)
    axes[0].add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, ec="c", lw=1.5))
    crop = soft[r0:r1, c0:c1]
    im = axes[3].imshow(crop.numpy(), cmap="inferno", alpha=0.7, vmin=0, vmax=max(1e-6, float(crop.max())),
                        interpolation="nearest")
    axes[3].add_patch(Rectangle((v * sw - c0 - 0.5, u * sh - r0 - 0.5), sw, sh, fill=False, ec="c", lw=1.5))
    axes[3].add_patch(Rectangle(((v - 1) * sw - c0 - 0.5, (u - 1) * sh - r0 - 0.5), 3 * sw, 3 * sh,
                                fill=False, ec="w", lw=0.8, ls="--"))
    fig.colorbar(im, ax=axes[3], fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stvit.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="an image file (any format PIL reads)")
    p.add_argument("--out", default="stokens.png", help="the PNG to write")
    p.add_argument("--checkpoint", help="associate the stage-1 features of this model checkpoint "
                   "(stvit.train or official) instead of the raw colours")
    p.add_argument("--model", default=None,
                   help="architecture of an official --checkpoint (default stvit_small)")
    p.add_argument("--img-size", type=int, default=224, help="model input side (with --checkpoint)")
    p.add_argument("--block", type=int, default=-1, help="the stage-1 block (with --checkpoint)")
    p.add_argument("--stoken-size", type=int, nargs="+", default=[16], help="super-token size on RGB: h [w]")
    p.add_argument("--n-iter", type=int, default=None,
                   help="association iterations (default 10 on RGB, the model's own with --checkpoint)")
    p.add_argument("--max-side", type=int, default=512, help="shrink larger RGB images to this side")
    p.add_argument("--token", type=int, nargs=2, metavar=("U", "V"), help="super token of the soft map")
    p.add_argument("--scale", type=float, default=None,
                   help="logit scale of the association on RGB (default STA's C ** -0.5; "
                        "larger: sharper maps)")
    p.add_argument("--backend", default=None, help="stvit_kernels backend")
    args = p.parse_args(argv)
    if len(args.stoken_size) > 2 or min(args.stoken_size) <= 0:
        p.error("--stoken-size takes one or two positive integers")
    if args.n_iter is not None and args.n_iter < 1:
        p.error("--n-iter must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Draw the figure; returns :func:`colour_variance`'s numbers (also printed)."""
    args = parse_args(argv)
    if args.checkpoint:
        check_img_size(args.img_size)
        image = load_image(args.image, square=args.img_size)
        net, name = load_backbone(args.checkpoint, args.model)
        if args.backend:
            for m in net.modules():
                if isinstance(m, sk.SuperTokenAttention):
                    m.backend = args.backend
        x = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        assoc = model_association(net, x, block=args.block, n_iter=args.n_iter)
        block = args.block % len(net.layers[0].blocks)
        title = f"{name}, stage-1 block {block}: {os.path.basename(args.checkpoint)}"
    else:
        size = pair(args.stoken_size[0] if len(args.stoken_size) == 1 else tuple(args.stoken_size))
        image = load_image(args.image, max_side=args.max_side, multiple=1)
        H, W = (image.shape[1] // size[0]) * size[0], (image.shape[2] // size[1]) * size[1]
        if H == 0 or W == 0:
            raise ValueError(f"the image ({image.shape[2]}x{image.shape[1]}) is smaller than one super "
                             f"token ({size[0]}x{size[1]})")
        image = image[:, :H, :W].contiguous()
        n_iter = args.n_iter or 10
        assoc = rgb_association(image, size, n_iter=n_iter, scale=args.scale, backend=args.backend)
        title = f"STA on RGB: {size[0]}x{size[1]} super tokens, {n_iter} iterations"
    stats = colour_variance(image, assoc)
    draw(image, assoc, args.out, token=tuple(args.token) if args.token else None, title=title)
    print(f"within-cluster colour variance: grid {stats['grid']:.5f}, association {stats['association']:.5f} "
          f"(ratio {stats['ratio']:.3f})")
    print(f"wrote {args.out}")
    return stats


def cli(argv: Optional[Sequence[str]] = None) -> int:
    try:
        main(argv)
    except (FileNotFoundError, ValueError, CheckpointMismatchError) as err:
        print(f"python -m stvit.visualize: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
