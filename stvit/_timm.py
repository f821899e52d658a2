"""STViT-S/B/L in timm's model registry: ``timm.create_model("stvit_small", num_classes=10)``.

:func:`install` runs on ``import stvit``. It never imports timm itself (timm and torchvision take
seconds to import): if timm is imported already, the models are registered at once; if timm is
installed but not imported yet, a one-shot import hook registers them right after ``import timm``
finishes; without timm it does nothing. Either import order works.

    >>> import stvit, timm
    >>> model = timm.create_model("stvit_small", pretrained=False, num_classes=10)
    >>> backbone = timm.create_model("stvit_base", features_only=True, out_indices=(1, 2, 3))
    >>> backbone.feature_info.channels()
    [192, 384, 512]

``pretrained=True`` needs a local official checkpoint (timm cannot download one for STViT)::

    timm.create_model("stvit_small", pretrained=True,
                      pretrained_cfg_overlay=dict(file="stvit-small-224.pth"))
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any, Dict, Optional

from .data import IMAGENET_MEAN, IMAGENET_STD

MODEL_NAMES = ("stvit_small", "stvit_base", "stvit_large")

#: The pretrained configs timm reads (input size, normalisation, first conv, classifier); no URL:
#: the official weights are not on a hub timm can reach.
default_cfgs: Dict[str, Dict[str, Any]] = {
    name: dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
               interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
               first_conv="patch_embed.proj.0", classifier="head", paper_ids="arXiv:2211.11167",
               paper_name="Vision Transformer with Super Token Sampling")
    for name in MODEL_NAMES
}

_registered = False


def _create(name: str, pretrained: bool = False, pretrained_cfg=None,
            pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, **kwargs):
    """Build an STViT for timm: timm's arguments in, an :class:`stvit.STViT` with timm's attributes
    (``pretrained_cfg``, ``default_cfg``, and in ``features_only`` mode a timm ``FeatureInfo``) out."""
    from timm.models import FeatureInfo, resolve_pretrained_cfg

    from . import model as stvit_model

    kwargs.pop("cache_dir", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    global_pool = kwargs.pop("global_pool", "avg")
    if global_pool not in ("avg", None):
        raise ValueError(f"{name} pools by averaging only; got global_pool={global_pool!r}")
    cfg = resolve_pretrained_cfg(name, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=pretrained_cfg_overlay).to_dict()
    model = getattr(stvit_model, name)(**kwargs)
    if pretrained:
        if not cfg.get("file"):
            raise RuntimeError(
                f"timm has no downloadable weights for {name}: pass an official checkpoint with "
                f"pretrained_cfg_overlay=dict(file='path/to/{name.replace('_', '-')}-224.pth'), or load one "
                f"afterwards with stvit.load_official_checkpoint(model, path)")
        res = stvit_model.load_official_checkpoint(model, cfg["file"], strict=False)
        other = [k for k in res.missing_keys + res.unexpected_keys if not k.startswith("head.")]
        other += [k for k, _, _ in res.mismatched_keys if not k.startswith("head.")]
        if other:
            raise stvit_model.CheckpointMismatchError(
                f"{cfg['file']!r} does not hold {name} weights: {len(other)} keys do not match, e.g. "
                f"{', '.join(other[:5])}")
    cfg["num_classes"] = model.num_classes
    model.pretrained_cfg = model.default_cfg = cfg
    if model.features_only:
        info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"layers.{i}")
                for i, c in enumerate(model.embed_dim)]
        model.feature_info = FeatureInfo(info, model.out_indices)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def stvit_small(pretrained: bool = False, **kwargs):
    """STViT-S (25.5M parameters, 83.6% ImageNet-1K top-1 at 224 px)."""
    return _create("stvit_small", pretrained, **kwargs)


def stvit_base(pretrained: bool = False, **kwargs):
    """STViT-B (51.7M parameters, 84.8% top-1)."""
    return _create("stvit_base", pretrained, **kwargs)


def stvit_large(pretrained: bool = False, **kwargs):
    """STViT-L (95.0M parameters, 85.3% top-1)."""
    return _create("stvit_large", pretrained, **kwargs)


def register() -> None:
    """Register the three models with timm (imports timm). Idempotent."""
    global _registered
    if _registered:
        return
    from timm.models import register_model

    for fn in (stvit_small, stvit_base, stvit_large):
        register_model(fn)
    _registered = True


def _register_quietly() -> None:
    try:
        register()
    except Exception as err:  # a timm whose API changed must not break `import timm` or `import stvit`
        warnings.warn(f"stvit: could not register the STViT models with timm: {err!r}")


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first ``import timm`` it lets the other finders find timm and
    wraps the loader so that the STViT models are registered as soon as timm has loaded."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing here
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_quietly()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if timm is imported, else after ``import timm``; nothing without timm."""
    timm = sys.modules.get("timm")
    if timm is not None:
        if getattr(timm, "create_model", None) is not None:  # fully imported
            _register_quietly()
        return
    if any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
        return
    try:
        installed = importlib.util.find_spec("timm") is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        sys.meta_path.insert(0, _AfterTimmImport())
